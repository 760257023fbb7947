"""From generated token ids to text: stop strings cut, and streaming deltas that never leak them."""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a tokenizer decodes half a UTF-8 character to


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class IncrementalText:
    """Text of one generated row, released as deltas while it is decoded.

    Held back until safe: the tail that might be the start of a stop string, and a trailing half
    UTF-8 character. `finish()` releases the rest, cut at the first stop string.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.eos_ids = eos_ids
        self.token_ids: list[int] = []
        self.released = 0  # characters already given out

    def append(self, token: int) -> str:
        """Record a token without decoding (batch generation decodes once, at the end)."""
        self.token_ids.append(token)
        return ""

    def push(self, token: int) -> str:
        """Record a token and return the text that is now safe to show."""
        self.token_ids.append(token)
        text = self.text()
        safe = len(text)
        if text.endswith(REPLACEMENT_CHAR):
            safe = len(text.rstrip(REPLACEMENT_CHAR))
        cut = cut_at_stop(text, self.stops)
        if len(cut) < len(text):  # a full stop string is in: release up to it, never past
            safe = len(cut)
        else:
            safe = min(safe, len(text) - stop_prefix_length(text, self.stops))
        return self._release(text, safe)

    def finish(self) -> str:
        text = cut_at_stop(self.text(), self.stops)
        return self._release(text, len(text))

    def text(self) -> str:
        ids = [t for t in self.token_ids if t not in self.eos_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def final_text(self) -> str:
        return cut_at_stop(self.text(), self.stops)

    def _release(self, text: str, upto: int) -> str:
        if upto <= self.released:
            return ""
        delta = text[self.released : upto]
        self.released = upto
        return delta
