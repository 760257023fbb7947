"""Request checks shared by every decoder and every caller that fits a prompt to a model: which
experts and which fusion mode a request names (per request or per row), and the one rule that fits
token ids to a context window. The vLLM processor imports this module without the engine."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.config import FUSION_MODES
from ..core.errors import ContextWindowError, RequestError, UnknownExpertError


def expert_list(experts: Sequence[str] | str | None, configured: Sequence[str]) -> list[str]:
    """The experts a request names (None: every configured one), each once; typed errors."""
    if experts is None:
        return list(configured)
    if isinstance(experts, str):
        experts = [experts]
    if not isinstance(experts, Sequence) or not all(isinstance(e, str) for e in experts):
        msg = (
            f"experts must be expert names, a list of them, or one list per prompt; got {experts!r}"
        )
        raise RequestError(msg)
    unknown = [e for e in experts if e not in configured]
    if unknown:
        known = ", ".join(configured) or "none configured"
        msg = f"unknown expert(s) {', '.join(map(repr, unknown))}; configured experts: {known}"
        raise UnknownExpertError(msg)
    return list(dict.fromkeys(experts))


def row_experts(
    experts: Sequence[str] | Sequence[Sequence[str] | None] | str | None,
    rows: int,
    configured: Sequence[str],
) -> list[list[str]]:
    """The experts of each of `rows` prompts: `experts` is one `expert_list` for every row, or one
    list (or None) per row, e.g. `[["math"], ["qa"], []]`; typed errors."""
    per_row = (
        isinstance(experts, Sequence)
        and not isinstance(experts, str)
        and len(experts) > 0
        and all(e is None or (isinstance(e, Sequence) and not isinstance(e, str)) for e in experts)
    )
    if not per_row:
        return [expert_list(experts, configured)] * rows
    if len(experts) != rows:
        msg = f"experts has {len(experts)} lists for {rows} prompts; give one list per prompt"
        raise RequestError(msg)
    return [expert_list(e, configured) for e in experts]


def fusion_mode(mode: str | None, default: str) -> str:
    """The fusion mode a request names (None: the config's); RequestError if unknown."""
    mode = mode or default
    if mode not in FUSION_MODES:
        msg = f"unknown fusion mode {mode!r}; use one of {', '.join(FUSION_MODES)}"
        raise RequestError(msg)
    return mode


def fit_to_window(
    ids: list[int],
    window: int | None,
    reserve: int,
    truncate: bool,
    *,
    reader: str,
    reserved: str = "reserved tokens",
) -> list[int]:
    """`ids` fitted to a model's context window, with `reserve` positions kept free after them.

    The one rule every prompt obeys (engine prompts, router scoring, gate references), with n =
    len(ids), W = window, R = reserve:
        1. W is None (the model states none), or n + R <= W: `ids` unchanged;
        2. else, if `truncate` and R < W: the last W - R ids (the left is cut: the end of a
           prompt is what the next token depends on);
        3. else ContextWindowError naming n, R, W, `reader` (the model, e.g. "small base") and
           `reserved` (what R counts, e.g. "max_new_tokens") and the fix.
    Generation reserves max_new_tokens and truncates only under `truncate_prompt`; `engine.score`
    reserves the continuation and truncates only under `truncate_prompt`; the router reserves
    nothing and always truncates; the gate reserves the reference it scores after the prompt and
    always truncates.
    """
    if window is None or len(ids) + reserve <= window:
        return ids
    room = window - reserve
    if truncate and room > 0:
        return ids[-room:]
    msg = (
        f"the prompt ({len(ids)} tokens) plus {reserved} ({reserve}) exceeds the "
        f"{reader}'s context window of {window} tokens; shorten the prompt, lower {reserved}"
        + (" or set truncate_prompt=True" if room > 0 else f" below {window}")
    )
    raise ContextWindowError(msg)
