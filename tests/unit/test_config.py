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
        (with_(generation={"stop": ["x"] * 10_000}), "at most 32 items"),
        (with_(generation={"stop": ["x" * 1000]}), "at most 256 characters"),
        (with_(generation={"seed": 2**64}), "generation.seed"),
        (with_(generation={"seed": -1}), "generation.seed"),
        (with_(fusion={"grid_step": 1e-7}), "20000001 grid points"),
        (with_(fusion={"grid_step": 100}), "does not divide"),
        (with_(fusion={"grid_step": 0.3}), "grid_step: 0.285714"),
        (with_(fusion={"alpha_max": 1e300}), "fusion.alpha_max"),
        (with_(fusion={"alpha_min": -1e300}), "fusion.alpha_min"),
        (with_(experts=[{"name": "m", "path": "a", "alpha": 1e39}]), "experts.0.alpha"),
        (with_(batching={"max_rows": 0}), "batching.max_rows"),
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


def test_defaults_are_static_fusion_and_the_papers_alpha_range():
    config = FusionConfig.load(BASE)
    assert config.fusion.mode == "static"
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


def test_values_read_from_a_file_must_have_the_declared_types(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[large]\npath = "/m/l"\n[small]\npath = "/m/s"\n[generation]\ntemperature = true\n'
    )
    with pytest.raises(ConfigError, match="generation.temperature.*valid number"):
        FusionConfig.load(tmp_path / "c.toml")
    (tmp_path / "c.yaml").write_text(
        "large: {path: /m/l}\nsmall: {path: /m/s}\nfusion: {alpha_max: '2'}\n"
    )
    with pytest.raises(ConfigError, match="fusion.alpha_max"):
        FusionConfig.load(tmp_path / "c.yaml")


def test_an_alias_bomb_gives_a_short_error_line(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]"
        for p, c in zip("abcdefg", "bcdefgh", strict=True)
    ]
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\nlarge: *h\nsmall: {path: /m/s}\n")
    assert (tmp_path / "bomb.yaml").stat().st_size < 600
    with pytest.raises(ConfigError) as caught:
        FusionConfig.load(tmp_path / "bomb.yaml")
    assert len(str(caught.value)) < 2000


def test_a_grid_step_that_divides_the_range_keeps_alpha_max_on_the_grid():
    from fusion_llm.core.fusion import alpha_grid

    fusion = FusionConfig.load(with_(fusion={"grid_step": 0.25, "alpha_max": 1.5})).fusion
    grid = alpha_grid(fusion.alpha_min, fusion.alpha_max, fusion.grid_step)
    assert grid.max().item() == 1.5 and grid.numel() == 7
