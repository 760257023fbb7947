"""`zoo.json`: what a zoo build made (every model's kind, base, task, size, train seconds, folder)."""

from __future__ import annotations

import json
from pathlib import Path

from fusion_llm.core.errors import ModelNotFoundError

MANIFEST = "zoo.json"


class ZooNotBuiltError(ModelNotFoundError):
    """The zoo's model folder is missing (a source checkout without weights, a wrong --models-dir)."""


def read_manifest(models_dir: Path) -> dict:
    path = Path(models_dir) / MANIFEST
    if not path.exists():
        msg = f"no zoo found at {models_dir}; create it with `fusion-llm zoo build`"
        raise ZooNotBuiltError(msg)
    return json.loads(path.read_text())


def write_manifest(models_dir: Path, manifest: dict) -> None:
    (Path(models_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
