"""The decoder contract: what the engine asks of whoever decodes (`batcher.ContinuousBatcher` over
HF models, or the vLLM backend's `VllmDecoder`), and the one fault policy they share.

Events. `submit(request, put)` takes a validated, tokenized `Request` on any thread and returns
its `Submission` at once; the request's events then reach `put`, called on the decoder's thread:
    1. zero or more lists of `RowEvent` (row: index in the submitted request; one token each, with
       alpha over the row's own experts and its fallback flag; `finished` set on a row's last);
    2. then `DONE` once every row has finished,
    or, at any point, one typed `FusionError` instead of what is left (nothing follows it).
Setting `submission.cancelled` (a caller that stops reading) takes the request's rows out at the
next step boundary; further events may still arrive and are to be ignored.

Faults. What a caller gets, by where the fault arose:
    own row      the large model has no finite logit for one of its rows: `row_fault()`
                 (NumericalFaultError) for that request only; the other rows of the step go on;
    shared step  a forward raises while rows of several requests run together: `typed_fault(..)`
                 of it (DeviceError for out of memory, the FusionError itself, DecoderFaultError
                 wrapping anything else): on the batcher only the request at fault (the others
                 run again alone, without repeating delivered steps), on vLLM every request of
                 that step (vLLM cannot replay a request from a step);
    start-up     the decoder cannot start (vLLM refused the config): `start()` raises the typed
                 error and every request gets it through `put`.
Whatever is raised (any `BaseException`), no caller is left waiting, and the decoder lives on:
the next request is decoded as if nothing had happened (a dead decoder thread is restarted by the
next `submit`).
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable
from typing import Protocol

import torch

from ..core.errors import (
    DecoderFaultError,
    DeviceError,
    FusionError,
    NumericalFaultError,
    described,
)
from .request import Request, Submission


class Decoder(Protocol):
    def submit(self, request: Request, put: Callable[[object], None]) -> Submission:
        """Queue a request; its events go to `put` (module docstring: events and faults)."""

    def start(self) -> None:
        """Be ready to decode now (otherwise the first request starts the decoder); raises the
        typed error that keeps the decoder from starting."""

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the decoder thread once it is idle."""


SHUTDOWN = object()  # queued at interpreter exit: an idle decoder ends before torch is torn down
_decoders: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_decoders() -> None:
    for decoder in list(_decoders):
        decoder.stop()


def stop_at_exit(decoder: Decoder) -> None:
    """Call `decoder.stop()` at interpreter exit (a thread torch still runs in then aborts)."""
    _decoders.add(decoder)


def row_fault() -> NumericalFaultError:
    """What a caller receives when the large model has no finite logit for one of its rows."""
    return NumericalFaultError(
        "the large model produced no finite logit for a row of this request; "
        "nothing can be sampled from it (check the model's weights and dtype)"
    )


def grammar_fault(token: int) -> DecoderFaultError:
    """What a caller receives when a constrained row sampled a token its grammar rejects (the
    mask makes this impossible unless the row had no allowed token left)."""
    return DecoderFaultError(
        f"token {token} broke the request's grammar (structured_outputs): the row had no allowed "
        "token; the engine is ready for the next call"
    )


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
