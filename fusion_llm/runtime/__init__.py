"""Decoding on HF models: loading, KV caches, the small-model pool, requests, the scheduler, the
continuous batcher and the decoder contract that every backend implements."""
