"""The shipped model family: three Llama bases sharing one tokenizer, their task experts, and the
recipe that re-creates them (`build_zoo`). `zoo_config` turns a choice of experts into an engine
config, so the family runs through the same public loading code as a user's own models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusion_llm.zoo.manifest import ZooNotBuiltError, read_manifest

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_EXPERT_KIND = {"small": "lora", "mid": "full"}  # mid has full fine-tunes only

__all__ = [
    "MODELS_DIR",
    "ZooNotBuiltError",
    "build_zoo",
    "read_manifest",
    "zoo_config",
    "zoo_info",
    "zoo_path",
]


def __getattr__(name: str) -> Any:
    # `build_zoo` imports torch: loaded on first use, so the CLI parses arguments without it.
    if name == "build_zoo":
        from fusion_llm.zoo.build import build_zoo

        return build_zoo
    msg = f"module 'fusion_llm.zoo' has no attribute {name!r}"
    raise AttributeError(msg)


def zoo_path(name: str, models_dir: Path = MODELS_DIR) -> Path:
    """The folder of a shipped model, e.g. `zoo_path("small-math-lora")`."""
    models = read_manifest(models_dir)["models"]
    if name not in models or not models[name]["shipped"]:
        shipped = sorted(n for n, m in models.items() if m["shipped"])
        msg = f"no shipped zoo model {name!r}; shipped models are: {', '.join(shipped)}"
        raise KeyError(msg)
    return models_dir / name


def zoo_info(models_dir: Path = MODELS_DIR) -> list[dict]:
    """One row per model the last build made: name, kind, base, task, seed, params, train seconds.

    `seed` is None in a manifest written before builds recorded it."""
    models = read_manifest(models_dir)["models"]
    return [
        {
            "name": name,
            **{
                k: m[k]
                for k in (
                    "kind",
                    "base",
                    "task",
                    "params",
                    "trainable_params",
                    "train_seconds",
                    "shipped",
                )
            },
            "seed": m.get("seed"),
        }
        for name, m in models.items()
    ]


def zoo_config(
    experts: list[str],
    source: str = "small",
    kind: str | None = None,
    mode: str = "dynamic",
    models_dir: Path = MODELS_DIR,
) -> dict:
    """An engine config dict: the large base, the `source` base and one expert per task name.
    `kind` is "lora" or "full" (default: LoRA on small, full fine-tunes on mid); the task name
    "multi" selects the multi-task fine-tune."""
    kind = kind or DEFAULT_EXPERT_KIND.get(source)
    if source not in DEFAULT_EXPERT_KIND or kind not in ("lora", "full"):
        msg = f"source must be 'small' or 'mid' and kind 'lora' or 'full', got {source!r}/{kind!r}"
        raise ValueError(msg)
    suffix = "-lora" if kind == "lora" else ""
    return {
        "large": {"path": str(zoo_path("large", models_dir))},
        "small": {"path": str(zoo_path(source, models_dir))},
        "experts": [
            {"name": task, "path": str(zoo_path(f"{source}-{task}{suffix}", models_dir))}
            for task in experts
        ],
        "fusion": {"mode": mode},
    }
