"""Configuration of a fusion engine: which models, how to fuse them, how to generate.

A config is a pydantic model, so it can be built in Python, from a dict, or from a YAML / TOML file
(:meth:`FusionConfig.load`). Unknown keys are rejected (a typo must not silently fall back to a
default), and every validation error is re-raised as :class:`~fusion_llm.errors.ConfigError` with the
path of the offending field in the message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, RequestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FusionMode = Literal["none", "static", "paper", "dynamic"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
# Above this a request is almost certainly a mistake (and would allocate a huge KV cache).
MAX_NEW_TOKENS_LIMIT = 1_000_000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Spec):
    """One causal LM: where it is and how to place it."""

    path: str = Field(min_length=1, description="Local directory or hub id of the checkpoint.")
    tokenizer: str | None = Field(
        None, description="Tokenizer location when it differs from `path`."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: DType = Field(
        "auto", description="`auto`: float32 on CPU, the checkpoint's own dtype on accelerators."
    )
    device: str = Field(
        "auto", description="`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:N` or `mps`."
    )
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="accelerate device map (e.g. `auto`) to shard a model; overrides `device`.",
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model.")
    allow_pickle: bool = Field(
        False, description="Allow pickle (`.bin`) weights; safetensors only when false."
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        kind = device.split(":", 1)[0]
        if kind not in {"auto", "cpu", "cuda", "mps"}:
            msg = f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}"
            raise ValueError(msg)
        return device


class ExpertSpec(ModelSpec):
    """A small expert: a full checkpoint fine-tuned from the small base, or a LoRA adapter on it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Name used to select the expert.")
    kind: Literal["auto", "full", "lora"] = Field(
        "auto", description="`auto` detects a LoRA adapter by its adapter_config.json."
    )
    alpha: float = Field(
        1.0, description="Weight in `static` mode, and lambda in task-arithmetic composition."
    )
    description: str = Field("", description="What the expert is for (read by routers).")
    examples: list[str] = Field(default_factory=list, description="Example prompts for routers.")


class FusionSpec(_Spec):
    """How the experts' logit differences are weighted at each step."""

    mode: FusionMode = Field("dynamic", description="none | static | paper | dynamic.")
    alpha_min: float = Field(0.0, description="Lower bound of alpha for `dynamic`.")
    alpha_max: float = Field(2.0, description="Upper bound of alpha for `dynamic` and `paper`.")
    grid_step: float = Field(0.1, gt=0, description="Grid step of the `paper` solver.")
    newton_steps: int = Field(
        3, ge=1, le=50, description="Safeguarded Newton iterations of the `dynamic` solver."
    )

    @model_validator(mode="after")
    def _ordered_bounds(self) -> FusionSpec:
        if self.alpha_min >= self.alpha_max:
            msg = (
                f"alpha_min ({self.alpha_min}) must be below alpha_max ({self.alpha_max}); "
                "swap them or widen the range"
            )
            raise ValueError(msg)
        return self


class GenerationSpec(_Spec):
    """Decoding settings; every field can be overridden per request."""

    max_new_tokens: int = Field(128, gt=0, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0, description="0 (or below 1e-5) means greedy decoding.")
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, description="Seed of the sampler; fixed seed, same output.")
    stop: list[str] = Field(default_factory=list, description="Stop strings, cut from the text.")
    truncate_prompt: bool = Field(
        False, description="Drop the oldest prompt tokens instead of failing when it is too long."
    )
    ignore_eos: bool = Field(
        False, description="Keep generating past EOS until max_new_tokens (for benchmarks)."
    )

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty; remove the empty string")
        return stop

    def updated(self, **overrides: Any) -> GenerationSpec:
        """This spec with request overrides applied (None means keep); raises RequestError."""
        values = self.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return GenerationSpec.model_validate(values)
        except ValidationError as err:
            raise RequestError(_describe(err, "request")) from None


class BatchingSpec(_Spec):
    """How concurrent requests are gathered into shared decoding batches."""

    window_ms: float = Field(
        2.0, ge=0, le=1000, description="How long the decoder waits for more requests to batch."
    )
    max_rows: int = Field(64, ge=1, description="Most prompts decoded together in one batch.")


class FusionConfig(_Spec):
    """The whole engine: large base, small base, experts, fusion and generation defaults."""

    large: ModelSpec
    small: ModelSpec
    experts: list[ExpertSpec] = Field(default_factory=list)
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts: list[ExpertSpec]) -> list[ExpertSpec]:
        names = [e.name for e in experts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            msg = f"expert names must be unique; duplicated: {', '.join(duplicates)}"
            raise ValueError(msg)
        return experts

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @classmethod
    def load(cls, source: FusionConfig | dict[str, Any] | str | Path) -> FusionConfig:
        """Build a config from a config, a dict, or a `.yaml`/`.yml`/`.toml`/`.json` file."""
        if isinstance(source, FusionConfig):
            return source
        data = _read_file(Path(source)) if isinstance(source, (str, Path)) else source
        if not isinstance(data, dict):
            msg = f"a config must be a mapping of fields, got {type(data).__name__}"
            raise ConfigError(msg)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(_describe(err, "config")) from None


def _read_file(path: Path) -> Any:
    if not path.is_file():
        msg = f"config file {str(path)!r} does not exist; pass the path of a YAML or TOML file"
        raise ConfigError(msg)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix in {".yaml", ".yml"}:
            return yaml.safe_load(text)
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
    except (
        yaml.YAMLError,
        tomllib.TOMLDecodeError,
        json.JSONDecodeError,
        UnicodeDecodeError,
    ) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        msg = f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {first_line}"
        raise ConfigError(msg) from None
    msg = f"config file {str(path)!r} must end in .yaml, .yml, .toml or .json"
    raise ConfigError(msg)


def _describe(err: ValidationError, what: str) -> str:
    """One line per invalid field: `field.path: problem (got value)`."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or what
        got = f" (got {e['input']!r})" if e["type"] != "missing" else ""
        lines.append(f"{where}: {e['msg']}{got}")
    return f"invalid {what}: " + "; ".join(lines)
