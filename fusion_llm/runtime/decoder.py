"""The decoder contract: what the engine asks of whoever decodes (the continuous batcher over HF
models, or vLLM), and the one fault policy they share.

A decoder takes prepared `Request`s on any thread and sends each request's events to its caller's
`put`: lists of `RowEvent`, then `DONE`, or one typed `FusionError` instead. Whatever a forward
raises, the caller receives `typed_fault(...)` of it and the decoder goes on with the next request.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable
from typing import Protocol

import torch

from ..core.errors import DecoderFaultError, DeviceError, FusionError, described
from .request import Request, Submission


class Decoder(Protocol):
    def submit(self, request: Request, put: Callable[[object], None]) -> Submission:
        """Queue a request; its events go to `put` (lists of RowEvent, then DONE, or an error)."""

    def start(self) -> None:
        """Be ready to decode now (the first request would otherwise start the decoder)."""

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the decoder thread once it is idle."""


SHUTDOWN = object()  # queued at interpreter exit: an idle decoder ends before torch is torn down
_decoders: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_decoders() -> None:
    for decoder in list(_decoders):
        decoder.stop()


def stop_at_exit(decoder) -> None:
    """Call `decoder.stop()` at interpreter exit (a thread torch still runs in then aborts)."""
    _decoders.add(decoder)


def typed_fault(fault: BaseException) -> FusionError:
    """What a caller receives for an exception raised while its rows were decoded."""
    if isinstance(fault, FusionError):
        return fault
    if isinstance(fault, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return DeviceError(
            "the accelerator ran out of memory; lower the batch size or max_new_tokens"
        )
    error = DecoderFaultError(
        f"decoding failed inside a model forward ({described(fault)}); the engine is ready for "
        "the next call"
    )
    error.__cause__ = fault
    return error
