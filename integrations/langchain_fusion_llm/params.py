"""Fields and parameter handling shared by `FusedLLM` and `ChatFusedLLM` (no fusion logic here).

Routing precedence for one call (first present wins, see `fusion_llm.router`):
    1. call keywords, bound or passed: `llm.bind(task="math")`, `bind(tasks=[...])`, `experts=[...]`;
    2. run metadata `fusion_tasks`: `llm.with_config(metadata={"fusion_tasks": ["math"]})`
       (LangChain merges metadata outer-first: a caller's `fusion_tasks` overrides the step's own);
    3. run tags `task:<name>`: `llm.with_config(tags=["task:math"])`;
    4. the `route` field: "all" (default), "none", "auto", "examples" or task names.
A route may be "auto" (likelihood-ratio router) or "examples" (nearest example prompts) at any
level: the router then picks experts per prompt.
The LangChain cache key (`_identifying_params` + call keywords) sees levels 1 and 4 only: do not
combine a cache with metadata- or tag-routing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

from fusion_llm import FusionConfig, FusionEngine
from fusion_llm.client import FusionClient, shared_engine
from fusion_llm.router import Route, Source, choose_route

PROVIDER = "fusion_llm"


class FusionFields(BaseModel):
    """The engine, routing and generation settings of a LangChain fusion model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: FusionEngine | None = Field(default=None, repr=False, exclude=True)
    """The fusion engine (models load on first use). Built from `config_path` when not given."""
    config_path: str | None = None
    """Fusion config file (YAML/TOML/JSON); models built from equal configs share one engine."""
    route: Route = "all"
    """Experts when no call keyword, metadata or tag names them (see the module docstring)."""
    router_threshold: float = 0.0
    """`auto` routing: minimum log-likelihood gain per prompt token (nats) to activate an expert."""
    max_experts: int | None = None
    """`auto` routing: keep at most this many experts per prompt (None: no limit)."""
    compose: str = "logits"
    """Several active experts combine by "logits" (joint alpha), "weights" (merged) or "both"."""
    compose_dir: str | None = None
    """Where merged experts are written under compose="weights" (None: the temp directory)."""
    mode: str | None = None
    """Fusion mode: "dynamic", "paper", "static" or "none" (None: the engine config's)."""
    max_tokens: int | None = None
    """Maximum number of new tokens (None: the engine config's `max_new_tokens`)."""
    temperature: float | None = None
    """Sampling temperature; 0 is greedy (None: the engine config's)."""
    top_k: int | None = None
    """Sample from the k most likely tokens only (None: the engine config's)."""
    top_p: float | None = None
    """Nucleus sampling mass (None: the engine config's)."""
    seed: int | None = None
    """Sampler seed; same seed, same output (None: the engine config's)."""
    stop: list[str] | None = None
    """Stop strings, cut from the output; call-time `stop` is added to these."""
    streaming: bool = False
    """Stream tokens to callbacks during `invoke` as well."""

    @classmethod
    def from_engine(cls, engine: FusionEngine, **fields: Any) -> Self:
        """A model over an existing engine (several models can share one)."""
        return cls(engine=engine, **fields)

    @classmethod
    def from_config(cls, config: FusionConfig | dict[str, Any] | str | Path, **fields: Any) -> Self:
        """A model over the shared engine of `config` (a file path, dict or FusionConfig)."""
        path = str(config) if isinstance(config, (str, Path)) else None
        return cls(engine=shared_engine(config), config_path=path, **fields)

    @model_validator(mode="after")
    def _attach_engine(self) -> FusionFields:
        if self.engine is None:
            if self.config_path is None:
                msg = "give `engine=` (a FusionEngine) or `config_path=` (a fusion config file)"
                raise ValueError(msg)
            self.engine = shared_engine(self.config_path)
        return self

    @property
    def client(self) -> FusionClient:
        return FusionClient(
            self.engine, self.router_threshold, self.max_experts, self.compose, self.compose_dir
        )

    @property
    def model_name(self) -> str:
        return self.engine.config.large.path

    def _overrides(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Engine keywords of one call: fields, then call keywords (routing keywords removed)."""
        stops = [*(self.stop or []), *(stop or []), *(kwargs.get("stop") or [])]
        params = {
            "mode": self.mode,
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(dict.fromkeys(stops)) or None,
        }
        if "max_tokens" in kwargs:
            params["max_new_tokens"] = kwargs["max_tokens"]
        params.update(
            (k, v)
            for k, v in kwargs.items()
            if k in {"mode", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
        )
        return {k: v for k, v in params.items() if v is not None}

    def _route(
        self, kwargs: dict[str, Any], run_manager: CallbackManagerForLLMRun | None
    ) -> tuple[Route, Source]:
        metadata = run_manager.metadata if run_manager else None
        tags = run_manager.tags if run_manager else None
        return choose_route(kwargs, metadata, tags, self.route)

    @property
    def _fusion_params(self) -> dict[str, Any]:
        config = self.engine.config
        return {
            "large": config.large.path,
            "small": config.small.path,
            "experts": config.expert_names,
            "mode": self.mode or config.fusion.mode,
            "route": self.route,
            "router_threshold": self.router_threshold,
            "max_experts": self.max_experts,
            "compose": self.compose,
            "max_tokens": self.max_tokens or config.generation.max_new_tokens,
            "temperature": config.generation.temperature
            if self.temperature is None
            else self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }

    def _ls_fields(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        params = {
            "ls_provider": PROVIDER,
            "ls_model_name": kwargs.get("model", self.model_name),
            "ls_temperature": kwargs.get("temperature", self.temperature),
            "ls_max_tokens": kwargs.get("max_tokens", self.max_tokens),
            "ls_stop": stop or self.stop,
        }
        return {k: v for k, v in params.items() if v is not None}
