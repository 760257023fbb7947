"""The CLI parses arguments and validates configs before importing the model stack: `--help` and
config mistakes never import torch, transformers or peft (what makes them answer at once)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

# Runs the CLI in a fresh interpreter and reports its exit code, stderr and the heavy modules loaded.
PROBE = """
import contextlib, io, json, sys
import fusion_llm.cli
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    code = fusion_llm.cli.main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print(json.dumps({"code": code, "stderr": err.getvalue(), "heavy": heavy}))
"""


def run_cli(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["generate", "--help"],
        ["demo", "--help"],
        ["bench", "--help"],
        ["reproduce", "--help"],
        ["zoo", "config", "--help"],
    ],
)
def test_help_imports_no_model_library(args):
    result = run_cli(*args)
    assert result == {"code": 0, "stderr": "", "heavy": []}


def test_a_missing_config_file_fails_without_importing_torch(tmp_path):
    result = run_cli("generate", "--config", str(tmp_path / "missing.yaml"), "hi")
    assert result["code"] == 2 and result["heavy"] == []
    assert "missing.yaml' does not exist" in result["stderr"]


def test_an_unknown_config_key_fails_without_importing_torch(tmp_path):
    bad = tmp_path / "fusion.yaml"
    bad.write_text("large: {path: /nowhere}\nsmall: {path: /nowhere}\nfusoin: {mode: static}\n")
    result = run_cli("generate", "--config", str(bad), "hi")
    assert result["code"] == 2 and result["heavy"] == []
    assert result["stderr"].startswith("error: invalid config: fusoin: Extra inputs")


@pytest.mark.slow
def test_importing_the_package_loads_the_engine_only_on_access():
    probe = (
        "import sys, fusion_llm; before = 'torch' in sys.modules; "
        "engine = fusion_llm.FusionEngine; print(before, 'torch' in sys.modules, engine.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == ["False", "True", "FusionEngine"]


def test_an_unknown_package_attribute_is_an_attribute_error():
    import fusion_llm

    with pytest.raises(AttributeError, match="no attribute 'FusedEngine'"):
        _ = fusion_llm.FusedEngine
