"""Stop strings: whether a row's generated text now contains one of its stop strings.

transformers' StopStringCriteria handles multi-token stops from the token table alone; for
tokenizers it cannot read (e.g. without a byte-level or metaspace decoder) the tail of each row's
text is decoded instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from transformers import StopStringCriteria

Tensor = torch.Tensor
STOP_PAD = 2**31 - 1  # left padding of short rows for the stop check: no token's text


def stop_checker(tokenizer, stops: Sequence[str]) -> Callable[[Tensor], list[bool]]:
    """generated ids [B, n] -> per row, whether its text now contains a stop string."""
    if not stops:
        return lambda generated: [False] * generated.shape[0]
    criteria = _stop_criteria(tokenizer, tuple(stops))
    if criteria is None:
        # A stop can only complete within its last len(stop) tokens (each token is >= 1 char).
        window = max(len(s) for s in stops) + 1

        def decoded_tail(generated: Tensor) -> list[bool]:
            texts = tokenizer.batch_decode(
                generated[:, -window:].tolist(), skip_special_tokens=True
            )
            return [any(s in text for s in stops) for text in texts]

        return decoded_tail
    return lambda generated: criteria(generated, None).tolist()


def stop_window(tokenizer, stops: Sequence[str]) -> int:
    """How many last tokens `stop_checker` needs to see."""
    criteria = _stop_criteria(tokenizer, tuple(stops)) if stops else None
    return (
        criteria.maximum_token_len if criteria is not None else max(map(len, stops), default=0) + 1
    )


def stopped(tokenizer, stops: Sequence[str], generated: Sequence[Sequence[int]]) -> list[bool]:
    """Per row, whether its text (generated ids `generated[b]`, newest last) now contains a stop."""
    width = stop_window(tokenizer, stops)
    tails = [list(ids[-width:]) for ids in generated]
    ids = torch.tensor([[STOP_PAD] * (width - len(t)) + t for t in tails])  # [B, width]
    return stop_checker(tokenizer, stops)(ids)


@lru_cache(maxsize=128)
def _stop_criteria(tokenizer, stops: tuple[str, ...]) -> StopStringCriteria | None:
    """One StopStringCriteria per (tokenizer, stops): building one scans the whole vocabulary
    (seconds at 150 k ids), its calls keep no state. None where it cannot read the tokenizer."""
    try:
        return StopStringCriteria(tokenizer, list(stops))
    except ValueError:
        return None
