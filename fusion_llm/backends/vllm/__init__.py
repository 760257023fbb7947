"""Fusion inside vLLM: the logits processor, the engine's vLLM backend and `fusion-llm serve`.

vLLM runs the large model (paged KV cache, continuous batching, tensor parallelism, its OpenAI
server); a fusion logits processor owns the small base and the experts and replaces each fused
request's logits by the fused distribution: `fused_rows.FusedRows` (the pool bookkeeping and the
fused step) under one class per vLLM model-runner interface, `processor.FusionLogitsProcessor`
(the V1 runner: vLLM on CPUs) and `processor_v2.FusionLogitsProcessorV2` (Model Runner V2: vLLM
on GPUs). The engine imports `backend` and `launch`, which import vllm only inside the functions
that start it; the processor modules, which vLLM loads, import vllm when imported.
"""
