"""Typed errors of fusion-llm.

Every error a user can cause derives from :class:`FusionError` and from the built-in type a Python
user would expect (``ValueError`` for bad values, ``FileNotFoundError`` for missing paths), so both
``except FusionError`` and ``except ValueError`` catch it. Each message says what to change.
"""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters ("" if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


def described(err: BaseException) -> str:
    """ "Type: first line" (or "Type"): what a one-line error message quotes of its cause."""
    line = first_line(err)
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


class FusionError(Exception):
    """Base class of every error raised on purpose by fusion-llm."""


class ConfigError(FusionError, ValueError):
    """The configuration (file, dict or object) is invalid."""


class ModelLoadError(FusionError, OSError):
    """A model, tokenizer or adapter could not be loaded from the configured path."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A configured model path is neither an existing directory nor a loadable hub id."""


class AdapterMismatchError(ModelLoadError, ValueError):
    """A LoRA adapter does not fit the configured small base (architecture or hidden size)."""


class VocabularyMismatchError(FusionError, ValueError):
    """Two models do not give the same meaning to the same token ids."""


class RequestError(FusionError, ValueError):
    """A generation request is invalid (prompt, sampling parameters, stop strings, experts)."""


class UnknownExpertError(RequestError, KeyError):
    """A request or routing rule names an expert that is not configured."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ContextWindowError(RequestError):
    """The prompt plus the tokens to generate do not fit a model's context window."""


class DataError(FusionError, ValueError):
    """A JSONL data file (training, validation or evaluation rows) has a bad row or is empty."""


class DeviceError(FusionError, RuntimeError):
    """The requested device is not available, or it ran out of memory during a request."""


class NumericalFaultError(FusionError, ArithmeticError):
    """The large model produced no finite logit for a row: nothing can be sampled from it."""


class DecoderFaultError(FusionError, RuntimeError):
    """A model forward failed while decoding this request; the decoder goes on with the next one."""
