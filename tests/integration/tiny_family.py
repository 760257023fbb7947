"""Session fixtures: fusion config FILES over the tiny real model family.

The adapters are built from config files (`config_path=`), so these fixtures write the root
conftest's tiny family config as YAML: `tiny_config` as built, `tool_config` over a copy whose
chat template renders tools, `plain_config` over a copy without chat templates. Use them with `pytest_plugins = ["tiny_family"]`.
"""

from __future__ import annotations

import shutil
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


# Renders only the tool names: the tiny models read 256 tokens.
TOOL_TEMPLATE = (
    "{% if tools %}<s>system: tools {% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n"
    "{% endif %}{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def config_with_template(family: dict[str, Path], folder: Path, template: str | None) -> str:
    """A config over a copy of `family` whose tokenizers have `template` (None: no chat template)."""
    for name, source in family.items():
        shutil.copytree(source, folder / name)
        template_file = folder / name / "chat_template.jinja"
        if template_file.exists():
            template_file.unlink()
            if template is not None:
                template_file.write_text(template)
    config = family_config({name: folder / name for name in family}, experts=EXPERTS)
    path = folder / "fusion.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="session")
def tool_config(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Like `tiny_config`, but the chat template renders the names of bound tools."""
    return config_with_template(tiny_family, tmp_path_factory.mktemp("tool_family"), TOOL_TEMPLATE)


@pytest.fixture(scope="session")
def plain_config(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Like `tiny_config`, but no model has a chat template."""
    return config_with_template(tiny_family, tmp_path_factory.mktemp("plain_family"), None)
