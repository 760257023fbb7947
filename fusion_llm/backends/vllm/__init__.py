"""Fusion inside vLLM: the logits processor, the engine's vLLM backend and `fusion-llm serve`.

vLLM runs the large model (paged KV cache, continuous batching, tensor parallelism, its OpenAI
server); `processor.FusionLogitsProcessor` owns the small base and the experts and replaces each
fused request's logits by the fused distribution. The engine imports `backend` and `launch`,
which import vllm only inside the functions that start it; `processor`, which vLLM loads, is the
one module that imports vllm when imported.
"""
