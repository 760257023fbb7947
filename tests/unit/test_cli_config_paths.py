"""Model paths in a config file are read relative to the file's folder, not the working directory;
hub ids and absolute paths stay as written, and configs given as dicts are left alone."""

from __future__ import annotations

from pathlib import Path

import yaml

from fusion_llm import FusionConfig


def write_config(folder: Path, large: str, small: str, expert: str) -> Path:
    path = folder / "fusion.yaml"
    config = {
        "large": {"path": large, "tokenizer": large},
        "small": {"path": small},
        "experts": [{"name": "math", "path": expert}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_existing_and_dotted_relative_paths_resolve_against_the_config_folder(
    tmp_path, monkeypatch
):
    (tmp_path / "models" / "large").mkdir(parents=True)
    path = write_config(tmp_path, "models/large", "./small", "../experts/math")
    monkeypatch.chdir(tmp_path / "models")  # a working directory where none of them resolve
    config = FusionConfig.load(path)
    assert config.large.path == config.large.tokenizer == str(tmp_path / "models" / "large")
    assert config.small.path == str(tmp_path / "small")  # missing, but clearly a local path
    assert config.experts[0].path == str((tmp_path / ".." / "experts" / "math").resolve())


def test_hub_ids_and_absolute_paths_stay_as_written(tmp_path):
    path = write_config(tmp_path, "Qwen/Qwen2-0.5B", "/opt/models/small", "org/math-expert")
    config = FusionConfig.load(str(path))
    assert config.large.path == "Qwen/Qwen2-0.5B"
    assert config.small.path == "/opt/models/small"
    assert config.experts[0].path == "org/math-expert"


def test_a_config_dict_keeps_its_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "large").mkdir()
    config = FusionConfig.load({"large": {"path": "large"}, "small": {"path": "./small"}})
    assert (config.large.path, config.small.path) == ("large", "./small")
