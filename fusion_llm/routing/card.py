"""An expert's card: `fusion_expert.json` next to its weights.

`fusion-llm train-expert` writes it (a sample of the training prompts as the expert's `examples`,
the training settings, the held-out validation file) and `fusion-llm gate` adds a verdict per large
model: does fusing this expert raise the likelihood of validation references over the large model
alone? The router reads both, so the `examples` route and the gate need no hand work.

    {"name": ..., "kind": "lora" | "full", "small_base": ..., "examples": [...],
     "validation": "validation.jsonl" | null, "training": {...},
     "verdicts": {<large model key>: {"helps": bool, "gain": nats per token, "specificity": ..., ...}}}
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..core.config import ExpertSpec, ModelSpec
from ..core.errors import ConfigError

CARD_FILE = "fusion_expert.json"


def card_path(spec: ExpertSpec) -> Path:
    return Path(spec.card) if spec.card else Path(spec.path) / CARD_FILE


def read_card(spec: ExpertSpec) -> dict[str, Any]:
    """The expert's card, {} when there is none (e.g. a hub expert without one)."""
    path = card_path(spec)
    if not path.is_file():
        return {}
    return _read(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=256)
def _read(path: str, mtime_ns: int) -> dict[str, Any]:
    """Parsed once per file version: the router reads cards on every call."""
    try:
        card = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = (
            f"expert card {path!r} is not valid JSON ({err}); delete it or rerun `fusion-llm gate`"
        )
        raise ConfigError(msg) from None
    if not isinstance(card, dict):
        msg = f"expert card {path!r} must hold a JSON object; delete it or rerun `fusion-llm gate`"
        raise ConfigError(msg)
    return card


def write_card(path: Path, card: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def expert_examples(spec: ExpertSpec) -> list[str]:
    """The config's `examples`, else the card's."""
    return list(spec.examples) or list(read_card(spec).get("examples", []))


def large_key(spec: ModelSpec) -> str:
    """Which large model a verdict was measured against: a resolved local path, or the hub id."""
    local = Path(spec.path).expanduser()
    key = str(local.resolve()) if local.exists() else spec.path
    return f"{key}@{spec.revision}" if spec.revision else key


def verdict(spec: ExpertSpec, large: ModelSpec) -> dict[str, Any] | None:
    """The expert's verdict against this large model, None when it was never measured."""
    return read_card(spec).get("verdicts", {}).get(large_key(large))


def store_verdict(spec: ExpertSpec, large: ModelSpec, measured: dict[str, Any]) -> Path:
    """Add (or replace) the verdict for `large` in the expert's card; returns the card's path."""
    path = card_path(spec)
    card = dict(read_card(spec)) or {"name": spec.name}
    card["verdicts"] = {**card.get("verdicts", {}), large_key(large): measured}
    write_card(path, card)
    return path
