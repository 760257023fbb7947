"""The package's import layers (pyproject `[tool.importlinter]`) hold: every import, function-level
ones included, points down `cli -> bench | eval -> zoo -> experts -> routing -> engine -> backends
-> runtime -> core`, and the engine never imports LangChain or LlamaIndex."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]


def test_import_layers_hold():
    lint = shutil.which("lint-imports")
    assert lint is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
