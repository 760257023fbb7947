"""The alpha channel from the fusion processor to the engine's in-process vLLM backend.

The processor runs inside vLLM's step; with vLLM's engine core and executor in this process it
records, for each traced request, the alpha and fallback flag of every sampled position, and the
backend takes them when it turns vLLM's outputs into row events.
"""

from __future__ import annotations

import threading

TRACE_KEY = "fusion_trace"  # SamplingParams.extra_args key naming the request's trace

# trace name -> {output position: (alpha over the request's experts, fallback)}
TRACES: dict[str, dict[int, tuple[list[float], bool]]] = {}
TRACES_LOCK = threading.Lock()
