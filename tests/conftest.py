"""Shared fixtures: a tiny real model family written to disk once per test session."""

from __future__ import annotations

import pytest
import transformers

from fusion_llm import FusionEngine
from fusion_llm.tiny import build_family, family_config
from fusion_llm.zoo import build_zoo

transformers.utils.logging.disable_progress_bar()
# Fixture modules that test modules import from before `pytest_plugins` loads them.
pytest.register_assert_rewrite("vllm_family")


def pytest_addoption(parser):
    parser.addoption("--run-soak", action="store_true", help="run the long soak tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-soak"):
        return
    skip = pytest.mark.skip(reason="soak test: pass --run-soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """{name: folder} for large, small, full, lora_a, lora_b (random weights, shared tokenizer)."""
    return build_family(tmp_path_factory.mktemp("tiny_family"))


@pytest.fixture(scope="session")
def engine(tiny_family):
    """One loaded engine over the tiny family with two LoRA experts and one full expert."""
    return FusionEngine(family_config(tiny_family)).load()


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory):
    """(root, manifest) of a zoo built at toy scale: models/ (shipped part) and baselines/."""
    root = tmp_path_factory.mktemp("zoo")
    manifest = build_zoo(root / "models", scale="toy", seed=0, baselines_dir=root / "baselines")
    return root, manifest
