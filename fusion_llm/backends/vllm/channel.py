"""The in-process channel between the engine's vLLM backend and the fusion processor.

With vLLM's engine core and executor in this process, the backend opens a `RowChannel` per row
before adding it to vLLM: the processor reads the row's own prompt renderings for the small
models from it (a chat template or few-shot prompt of their own, as on the HF backend) and records
each fused position's `StepTrace` into it (alpha, fallback, and the fault that ends the row's
request). A request from anywhere else (an HTTP client naming a key) finds no channel: its small
models read vLLM's prompt and nothing is recorded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import NamedTuple

CHANNEL_KEY = "fusion_row"  # SamplingParams.extra_args key naming the row's channel


class StepTrace(NamedTuple):
    """What the processor saw when it fused one position of a row."""

    alpha: list[float]  # over the row's own experts
    fallback: bool  # the large model ruled this step
    fault: bool  # the large model had no finite logit: the row's request fails


UNFUSED = StepTrace([], False, False)  # a position the processor did not fuse (no experts)


@dataclass
class RowChannel:
    small: list[int]  # the small base's prompt ids
    experts: dict[str, list[int]] = field(default_factory=dict)  # renderings of single experts
    steps: dict[int, StepTrace] = field(default_factory=dict)  # output position -> its trace


CHANNELS: dict[str, RowChannel] = {}
CHANNELS_LOCK = threading.Lock()
