"""Config validation: every bad field is a ConfigError naming the field."""

from __future__ import annotations

import pytest

from fusion_llm import ConfigError, FusionConfig, GenerationSpec, RequestError

BASE = {"large": {"path": "/models/large"}, "small": {"path": "/models/small"}}


def with_(**sections):
    return {**BASE, **sections}


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"small": BASE["small"]}, "large"),
        (with_(large={"path": ""}), "large.path"),
        (with_(large={"path": "x", "dtype": "int3"}), "large.dtype"),
        (with_(large={"path": "x", "device": "tpu"}), "large.device"),
        (with_(large={"path": "x", "colour": "red"}), "large.colour"),
        (with_(experts=[{"name": "m", "path": "a"}, {"name": "m", "path": "b"}]), "duplicated: m"),
        (with_(experts=[{"name": "bad name!", "path": "a"}]), "experts.0.name"),
        (with_(experts=[{"name": "m", "path": "a", "kind": "qlora"}]), "experts.0.kind"),
        (with_(fusion={"mode": "magic"}), "fusion.mode"),
        (with_(fusion={"alpha_min": 2.0, "alpha_max": 1.0}), "alpha_min"),
        (with_(fusion={"grid_step": 0}), "fusion.grid_step"),
        (with_(generation={"max_new_tokens": 0}), "generation.max_new_tokens"),
        (with_(generation={"temperature": -1}), "generation.temperature"),
        (with_(generation={"top_p": 1.5}), "generation.top_p"),
        (with_(generation={"top_p": float("nan")}), "generation.top_p"),
        (with_(generation={"stop": ["ok", ""]}), "generation.stop"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_config_raises_config_error_naming_the_field(config, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        FusionConfig.load(config)


def test_config_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        FusionConfig.load({"large": {}})


def test_yaml_toml_and_json_files_load_to_the_same_config(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "large: {path: /m/l}\nsmall: {path: /m/s}\nexperts:\n  - {name: math, path: /m/e, alpha: 0.5}\n"
        "fusion: {mode: paper}\n"
    )
    (tmp_path / "c.toml").write_text(
        '[large]\npath = "/m/l"\n[small]\npath = "/m/s"\n[[experts]]\nname = "math"\npath = "/m/e"\n'
        'alpha = 0.5\n[fusion]\nmode = "paper"\n'
    )
    (tmp_path / "c.json").write_text(
        '{"large": {"path": "/m/l"}, "small": {"path": "/m/s"}, "experts": [{"name": "math", '
        '"path": "/m/e", "alpha": 0.5}], "fusion": {"mode": "paper"}}'
    )
    configs = [FusionConfig.load(tmp_path / f"c.{ext}") for ext in ("yaml", "toml", "json")]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].expert_names == ["math"] and configs[0].fusion.mode == "paper"


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("c.yaml", "large: [unclosed", "not valid YAML"),
        ("c.toml", "large = = 1", "not valid TOML"),
        ("c.yaml", "- just\n- a list\n", "mapping"),
        ("c.ini", "[large]", "must end in"),
    ],
)
def test_unreadable_config_files_raise_config_error(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        FusionConfig.load(tmp_path / name)


def test_missing_config_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        FusionConfig.load(tmp_path / "nope.yaml")


def test_defaults_are_the_papers_setting():
    config = FusionConfig.load(BASE)
    assert config.fusion.mode == "dynamic"
    assert (config.fusion.alpha_min, config.fusion.alpha_max, config.fusion.grid_step) == (
        0.0,
        2.0,
        0.1,
    )
    assert config.generation.temperature == 0.0  # greedy
    assert config.large.allow_pickle is False and config.large.trust_remote_code is False


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_new_tokens": -3},
        {"temperature": -0.5},
        {"top_p": 0.0},
        {"top_k": 0},
        {"stop": [""]},
        {"temperature": float("nan")},
        {"max_new_tokens": 10**9},
    ],
)
def test_bad_request_overrides_raise_request_error(overrides):
    with pytest.raises(RequestError):
        GenerationSpec().updated(**overrides)


def test_request_overrides_keep_unset_fields():
    spec = GenerationSpec(max_new_tokens=5, stop=["x"]).updated(temperature=0.7, top_p=None)
    assert (spec.max_new_tokens, spec.stop, spec.temperature, spec.top_p) == (5, ["x"], 0.7, 1.0)
