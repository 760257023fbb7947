"""Decoders other than the in-process continuous batcher."""
