"""Request validation shared by every decoder: which experts and which fusion mode a request
names. The vLLM processor imports it without the engine."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.config import FUSION_MODES
from ..core.errors import RequestError, UnknownExpertError


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


def fusion_mode(mode: str | None, default: str) -> str:
    """The fusion mode a request names (None: the config's); RequestError if unknown."""
    mode = mode or default
    if mode not in FUSION_MODES:
        msg = f"unknown fusion mode {mode!r}; use one of {', '.join(FUSION_MODES)}"
        raise RequestError(msg)
    return mode
