"""Configuration of a fusion engine: which models, how to fuse them, how to generate.

A config is a pydantic model, so it can be built in Python, from a dict, or from a YAML / TOML file
(:meth:`FusionConfig.load`). Unknown keys are rejected (a typo must not silently fall back to a
default), and every validation error is re-raised as :class:`~fusion_llm.core.errors.ConfigError` with the
path of the offending field in the message.
"""

from __future__ import annotations

import json
import os
import reprlib
import sys
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, RequestError, first_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FusionMode = Literal["none", "static", "paper", "dynamic"]
FUSION_MODES: tuple[str, ...] = get_args(FusionMode)  # every mode, "none" (large alone) first
FUSED_MODES = FUSION_MODES[1:]  # the modes that fuse experts
GateMode = Literal["off", "warn", "enforce"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
# Above this a request is almost certainly a mistake (and would allocate a huge KV cache).
MAX_NEW_TOKENS_LIMIT = 1_000_000
# What one request may cost the shared decoder: stop strings are checked at every step.
MAX_STOP_STRINGS = 32
MAX_STOP_LENGTH = 256
# |alpha| beyond this only saturates the fused distribution (and overflows float32 later).
ALPHA_LIMIT = 100.0
# The paper grid has 21 points; beyond this a grid step is a mistake that costs a pass per point.
MAX_GRID_POINTS = 1001
SEED_LIMIT = 2**64  # torch generators take 64-bit seeds
# Alternatives per token a request may ask log-probabilities of (vLLM's `max_logprobs`).
MAX_LOGPROBS = 20


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

    @field_validator("path", "tokenizer")
    @classmethod
    def _expand_home(cls, location: str | None) -> str | None:
        return os.path.expanduser(location) if location and location.startswith("~") else location

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
        1.0,
        ge=-ALPHA_LIMIT,
        le=ALPHA_LIMIT,
        description="Weight in `static` mode, and lambda in task-arithmetic composition.",
    )
    description: str = Field("", description="What the expert is for (read by routers).")
    examples: list[str] = Field(
        default_factory=list,
        description="Example prompts for routers; empty: those in the expert's card, if any.",
    )
    card: str | None = Field(
        None,
        description="The expert's card (examples, gate verdicts) written by `fusion-llm "
        "train-expert` / `fusion-llm gate`; None: `fusion_expert.json` in `path`.",
    )


class FusionSpec(_Spec):
    """How the experts' logit differences are weighted at each step."""

    # static: on the real pair (docs/real_models.md) no mode beat it on either task, and it does the
    # least work per step.
    mode: FusionMode = Field("static", description="none | static | paper | dynamic.")
    alpha_min: float = Field(
        0.0,
        ge=-ALPHA_LIMIT,
        le=ALPHA_LIMIT,
        description="Lower bound of alpha (`paper`, `dynamic`).",
    )
    alpha_max: float = Field(
        2.0,
        ge=-ALPHA_LIMIT,
        le=ALPHA_LIMIT,
        description="Upper bound of alpha (`paper`, `dynamic`).",
    )
    grid_step: float = Field(
        0.1,
        gt=0,
        description="Grid step of `paper` (and the scan of `dynamic`); divides the range.",
    )
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
        intervals = (self.alpha_max - self.alpha_min) / self.grid_step
        if intervals + 1 > MAX_GRID_POINTS:
            msg = (
                f"grid_step {self.grid_step} makes {intervals + 1:.0f} grid points over "
                f"[{self.alpha_min}, {self.alpha_max}]; at most {MAX_GRID_POINTS} (e.g. grid_step: 0.1)"
            )
            raise ValueError(msg)
        if round(intervals) < 1 or abs(intervals - round(intervals)) > 1e-6 * max(1.0, intervals):
            fitting = (self.alpha_max - self.alpha_min) / max(1, round(intervals))
            msg = (
                f"grid_step {self.grid_step} does not divide [{self.alpha_min}, {self.alpha_max}] "
                f"into whole steps, so the grid would miss alpha_max; use e.g. grid_step: {fitting:.6g}"
            )
            raise ValueError(msg)
        return self


class StructuredOutputs(_Spec):
    """A grammar every generated token must follow (vLLM's `structured_outputs` fields): exactly
    one of `json`, `regex`, `choice`, `grammar`, `json_object`, `structural_tag`."""

    json_schema: dict[str, Any] | str | None = Field(
        None, alias="json", description="A JSON schema (object, or its JSON text)."
    )
    regex: str | None = Field(None, description="A regular expression the whole output matches.")
    choice: list[str] | None = Field(None, description="The output is one of these strings.")
    grammar: str | None = Field(None, description="An EBNF grammar (xgrammar's dialect).")
    json_object: bool | None = Field(None, description="true: any JSON object.")
    structural_tag: dict[str, Any] | str | None = Field(
        None, description="An xgrammar structural tag (object, or its JSON text)."
    )
    disable_any_whitespace: bool = Field(
        False, description="JSON without optional whitespace (compact separators)."
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        given = [name for name in STRUCTURED_KINDS if getattr(self, _KIND_FIELDS[name]) is not None]
        if len(given) != 1:
            msg = (
                f"give exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                f"{', '.join(given) or 'none'}"
            )
            raise ValueError(msg)
        if self.choice is not None and not self.choice:
            raise ValueError("choice must list at least one string")
        if self.json_object is False:
            raise ValueError("json_object must be true when given")
        return self

    @property
    def kind(self) -> str:
        """Which constraint this is: one of STRUCTURED_KINDS."""
        return next(k for k in STRUCTURED_KINDS if getattr(self, _KIND_FIELDS[k]) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, _KIND_FIELDS[self.kind])


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_KIND_FIELDS = {k: "json_schema" if k == "json" else k for k in STRUCTURED_KINDS}


def structured_from_response_format(response_format: Any) -> StructuredOutputs | None:
    """OpenAI's `response_format` as a constraint: `{"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}`, `{"type": "json_object"}`, `{"type": "structural_tag", ...}`
    or `{"type": "text"}` (None: no constraint). Raises RequestError naming the field."""
    if not isinstance(response_format, dict) or "type" not in response_format:
        msg = "response_format must be an object with a 'type' (json_schema, json_object or text)"
        raise RequestError(msg)
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        body = response_format.get("json_schema")
        schema = body.get("schema", body.get("json_schema")) if isinstance(body, dict) else None
        if not isinstance(schema, (dict, str)):
            msg = "response_format.json_schema.schema must be a JSON schema object"
            raise RequestError(msg)
        return StructuredOutputs(json=schema)
    if kind == "structural_tag":
        return StructuredOutputs(structural_tag=response_format)
    msg = f"response_format.type must be json_schema, json_object, structural_tag or text, got {kind!r}"
    raise RequestError(msg)


class GenerationSpec(_Spec):
    """Decoding settings; every field can be overridden per request."""

    max_new_tokens: int = Field(128, gt=0, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0, description="0 (or below 1e-5) means greedy decoding.")
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="Seed of the sampler (0 <= seed < 2**64)."
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP_STRINGS,
        description=f"Stop strings (at most {MAX_STOP_STRINGS}, each up to {MAX_STOP_LENGTH} characters), cut from the text.",
    )
    truncate_prompt: bool = Field(
        False, description="Drop the oldest prompt tokens instead of failing when it is too long."
    )
    ignore_eos: bool = Field(
        False, description="Keep generating past EOS until max_new_tokens (for benchmarks)."
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log-probabilities of each generated token under the fused distribution it "
        f"was sampled from (before temperature, top-k and top-p): None: off; k (0 <= k <= "
        f"{MAX_LOGPROBS}): the chosen token's and the k most likely tokens'.",
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="A grammar the output follows (JSON schema, regex, choice, EBNF, tag)."
    )

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty; remove the empty string")
        if any(len(s) > MAX_STOP_LENGTH for s in stop):
            msg = f"each stop string may have at most {MAX_STOP_LENGTH} characters"
            raise ValueError(msg)
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


class VllmSpec(_Spec):
    """How the `vllm` backend (and `fusion-llm serve`) runs the large model inside vLLM."""

    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs the large model is split over (vLLM's tensor parallelism)."
    )
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages (e.g. one per node).")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        None,
        description="vLLM's executor: None picks (in-process for one device), `ray` for several nodes.",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length vLLM reserves KV pages for; None: the model's."
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV cache size in GiB per worker; None: on CPU, room for max_num_seqs "
        "sequences of max_model_len tokens, at most 4 GiB and half the free memory (at least one "
        "sequence); on GPUs vLLM's (from gpu_memory_utilization).",
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of accelerator memory vLLM may use; None: vLLM's."
    )
    enforce_eager: bool | None = Field(
        None, description="No CUDA graphs / compilation; None: eager on CPU (quick start)."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Further `vllm.EngineArgs` fields, passed as they are."
    )


class FusionConfig(_Spec):
    """The whole engine: large base, small base, experts, fusion and generation defaults."""

    large: ModelSpec
    small: ModelSpec
    experts: list[ExpertSpec] = Field(default_factory=list)
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Who runs the large model: `hf` (transformers, in this process) or `vllm` "
        "(paged KV cache, tensor parallelism; needs the vllm extra).",
    )
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    gate: GateMode = Field(
        "warn",
        description="What the router does with an expert whose card says fusing it lowers the "
        "likelihood of validation references: off (ignore), warn, enforce (never activate it).",
    )

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
        if isinstance(source, (str, Path)):
            data = _paths_relative_to(Path(source).parent, data)
        try:
            # Values read from a file must have the declared types (TOML `temperature = true` is
            # no temperature); Python callers keep pydantic's usual conversions.
            return cls.model_validate(data, strict=isinstance(source, (str, Path)))
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
        msg = f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {first_line(err) or type(err).__name__}"
        raise ConfigError(msg) from None
    msg = f"config file {str(path)!r} must end in .yaml, .yml, .toml or .json"
    raise ConfigError(msg)


def _paths_relative_to(folder: Path, data: dict) -> dict:
    """A config file's relative model paths (`path`, `tokenizer`) are read from the file's folder,
    whatever the working directory: one that exists there, or starts with `./` or `../`, becomes
    that absolute folder; anything else (a hub id such as `org/name`) stays as written."""

    def resolved(spec: Any) -> Any:
        if not isinstance(spec, dict):
            return spec  # validation reports it
        spec = dict(spec)
        for key in ("path", "tokenizer"):
            value = spec.get(key)
            if not isinstance(value, str) or not value or Path(value).is_absolute():
                continue
            if value.startswith(("./", "../")) or (folder / value).exists():
                spec[key] = str((folder / value).resolve())
        return spec

    data = {**data, **{k: resolved(data[k]) for k in ("large", "small") if k in data}}
    if isinstance(data.get("experts"), list):
        data["experts"] = [resolved(e) for e in data["experts"]]
    return data


_echo = reprlib.Repr()  # echoes of bad input stay short (a YAML alias bomb expands hugely)
_echo.maxstring = _echo.maxother = 80
_echo.maxlist = _echo.maxdict = 4
_echo.maxlevel = 2


def _describe(err: ValidationError, what: str) -> str:
    """One line per invalid field: `field.path: problem (got value)`; echoed values are bounded."""
    lines = []
    errors = err.errors()
    for e in errors[:10]:
        where = ".".join(str(p) for p in e["loc"]) or what
        got = f" (got {_echo.repr(e['input'])})" if e["type"] != "missing" else ""
        lines.append(f"{where}: {e['msg']}{got}")
    if len(errors) > 10:
        lines.append(f"and {len(errors) - 10} more")
    return f"invalid {what}: " + "; ".join(lines)
