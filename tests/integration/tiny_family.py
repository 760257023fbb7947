"""Session fixture: the tiny real model family (random weights) and a fusion config over it.

Use it from a test module with `pytest_plugins = ["tiny_family"]`.
Generation defaults stay short (8 new tokens) so that suites over the family run quickly.
"""

from __future__ import annotations

import pytest
import yaml

from fusion_llm.tiny import build_family

EXPERTS = ("full", "lora_a", "lora_b")
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a YAML fusion config: tiny large + small bases, experts `full`, `lora_a`, `lora_b`."""
    root = tmp_path_factory.mktemp("tiny_family")
    paths = build_family(root)
    config = {
        "large": {"path": str(paths["large"]), "device": "cpu"},
        "small": {"path": str(paths["small"]), "device": "cpu"},
        "experts": [{"name": name, "path": str(paths[name]), "device": "cpu"} for name in EXPERTS],
        "generation": {"max_new_tokens": MAX_NEW_TOKENS},
    }
    path = root / "fusion.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)
