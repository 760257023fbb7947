"""Session fixture `tiny_config`: a fusion config FILE over the tiny real model family.

The adapters are built from config files (`config_path=`), so the fixture writes the root
conftest's tiny family config as YAML. Use it with `pytest_plugins = ["tiny_family"]`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusion_llm.tiny import family_config

EXPERTS = ("full", "lora_a", "lora_b")


@pytest.fixture(scope="session")
def tiny_config(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a YAML config: tiny large + small bases, experts `full`, `lora_a`, `lora_b`, 8 new tokens."""
    path = tmp_path_factory.mktemp("tiny_config") / "fusion.yaml"
    path.write_text(yaml.safe_dump(family_config(tiny_family, experts=EXPERTS)))
    return str(path)
