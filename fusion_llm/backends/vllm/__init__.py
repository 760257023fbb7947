"""Fusion inside vLLM: the logits processor, the engine's vLLM backend and `fusion-llm serve`.

vLLM runs the large model (paged KV cache, continuous batching, tensor parallelism, its OpenAI
server); `processor.FusionLogitsProcessor` owns the small base and the experts and replaces each
fused request's logits by the fused distribution. Nothing here is imported unless vLLM is used.
"""
