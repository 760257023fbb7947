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

    Streaming decodes incrementally, O(1) per token: only the tokens since the last complete
    character are decoded, beside the token before them, whose text is subtracted (decoders that
    drop a leading space at the start of a decode drop it from both). Stop strings are searched
    only in the text not yet released: a released text never ends in the start of a stop.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.eos_ids = eos_ids
        self.token_ids: list[int] = []
        self.released = 0  # characters already given out
        self._text = ""  # streamed text so far (complete characters only)
        self._ids: list[int] = []  # generated ids without EOS
        self._prefix = 0  # start of the decode window in _ids
        self._read = 0  # _ids[:_read] are in _text
        self._stop_at: int | None = None  # where the first stop string starts in _text

    def append(self, token: int) -> str:
        """Record a token without decoding (batch generation decodes once, at the end)."""
        self.token_ids.append(token)
        return ""

    def push(self, token: int) -> str:
        """Record a token and return the text that is now safe to show."""
        self.token_ids.append(token)
        if token not in self.eos_ids and self._stop_at is None:
            self._ids.append(token)
            self._decode_new()
        if self._stop_at is not None:  # a full stop string is in: release up to it, never past
            return self._release(self._text, self._stop_at)
        safe = len(self._text) - stop_prefix_length(self._text[self.released :], self.stops)
        return self._release(self._text, safe)

    def finish(self) -> str:
        text = self.final_text()
        return self._release(text, len(text))

    def text(self) -> str:
        ids = [t for t in self.token_ids if t not in self.eos_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def final_text(self) -> str:
        if self._stop_at is not None:
            return self._text[: self._stop_at]
        if self._ids and self._read == len(self._ids):  # streamed: the deltas already add up
            return self._text
        return cut_at_stop(self.text(), self.stops)

    def _decode_new(self) -> None:
        decode = self.tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        window = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if window.endswith(REPLACEMENT_CHAR):
            return  # half a character: wait for the rest of its bytes
        start = max(self.released, len(self._text) - max(map(len, self.stops), default=0))
        if window.startswith(before):
            self._text += window[len(before) :]
        else:  # the decoder rewrote earlier text (space clean-up): decode the row once in full
            self._text = decode(self._ids, skip_special_tokens=True)
        self._prefix, self._read = max(self._read - 1, 0), len(self._ids)
        found = [i for i in (self._text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self._stop_at = min(found)

    def _release(self, text: str, upto: int) -> str:
        if upto <= self.released:
            return ""
        delta = text[self.released : upto]
        self.released = upto
        return delta


def token_texts(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> list[str]:
    """The text each generated token adds (for traces): differences of successive decodes, so
    spaces a tokenizer puts between tokens land on the token that brings them."""
    texts, previous = [], ""
    for end in range(1, len(token_ids) + 1):
        current = tokenizer.decode(list(token_ids[:end]))
        texts.append(current[len(previous) :] if current.startswith(previous) else current)
        previous = current
    return texts
