"""The in-process channel between the engine's vLLM backend and the fusion processor.

With vLLM's engine core and executor in this process, the backend opens a `RowChannel` per row
before adding it to vLLM: the processor reads the row's own prompt renderings for the small
models from it (a chat template or few-shot prompt of their own, as on the HF backend) and records
each sampled position's alpha and fallback flag into it. A request from anywhere else (an HTTP
client naming a key) finds no channel: its small models read vLLM's prompt and nothing is recorded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

CHANNEL_KEY = "fusion_row"  # SamplingParams.extra_args key naming the row's channel


@dataclass
class RowChannel:
    small: list[int]  # the small base's prompt ids
    experts: dict[str, list[int]] = field(default_factory=dict)  # renderings of single experts
    steps: dict[int, tuple[list[float], bool]] = field(
        default_factory=dict
    )  # position -> alpha, fallback


CHANNELS: dict[str, RowChannel] = {}
CHANNELS_LOCK = threading.Lock()
