"""Fields and parameter handling shared by `FusedLLM` and `ChatFusedLLM` (no fusion logic here).

Routing precedence for one call (first present wins, see `fusion_llm.routing.router`):
    1. call keywords, bound or passed: `llm.bind(task="math")`, `bind(tasks=[...])`, `experts=[...]`;
    2. run metadata `fusion_tasks`: `llm.with_config(metadata={"fusion_tasks": ["math"]})`
       (LangChain merges metadata outer-first: a caller's `fusion_tasks` overrides the step's own);
    3. run tags `task:<name>`: `llm.with_config(tags=["task:math"])`;
    4. the `route` field: "all" (default), "none", "auto", "examples" or task names.
A route may be "auto" (likelihood-ratio router) or "examples" (nearest example prompts) at any
level: the router then picks experts per prompt.
The LangChain cache key (`_identifying_params` + call keywords) sees levels 1 and 4 only: do not
combine a cache with metadata- or tag-routing.

Call keywords: the routing ones above, `max_tokens` (alias `max_new_tokens`), `temperature`,
`top_k`, `top_p`, `seed`, `mode` and `stop` (a bare string is one stop string); any other keyword
is refused with a typed `RequestError` (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from typing_extensions import Self

from fusion_llm import FusionConfig, FusionEngine, FusionPrompt
from fusion_llm.routing.client import (
    FusionClient,
    RoutedGeneration,
    check_keywords,
    shared_engine,
    stop_strings,
    with_engine,
)
from fusion_llm.routing.router import CALL_KEYWORDS, Route, Source, choose_route

PROVIDER = "fusion_llm"
SAMPLING_KEYWORDS = ("mode", "temperature", "top_k", "top_p", "seed")
CALL_KEYWORD_NAMES = (*CALL_KEYWORDS, *SAMPLING_KEYWORDS, "max_tokens", "max_new_tokens", "stop")


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
    max_tokens: int | None = Field(
        default=None, validation_alias=AliasChoices("max_tokens", "max_new_tokens")
    )
    """Maximum number of new tokens, also accepted as `max_new_tokens` (None: the engine config's)."""
    temperature: float | None = None
    """Sampling temperature; 0 is greedy (None: the engine config's)."""
    top_k: int | None = None
    """Sample from the k most likely tokens only (None: the engine config's)."""
    top_p: float | None = None
    """Nucleus sampling mass (None: the engine config's)."""
    seed: int | None = None
    """Sampler seed; same seed, same output (None: the engine config's)."""
    stop: list[str] | None = None
    """Stop strings (a bare string is one), cut from the output; call-time `stop` is added."""
    streaming: bool = False
    """Stream tokens to callbacks during `invoke` as well."""

    # Call keywords this model takes besides CALL_KEYWORD_NAMES (e.g. bound tools).
    extra_call_keywords: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **fields: Any) -> None:
        super().__init__(**with_engine(fields))

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @classmethod
    def from_engine(cls, engine: FusionEngine, **fields: Any) -> Self:
        """A model over an existing engine (several models can share one)."""
        return cls(engine=engine, **fields)

    @classmethod
    def from_config(cls, config: FusionConfig | dict[str, Any] | str | Path, **fields: Any) -> Self:
        """A model over the shared engine of `config` (a file path, dict or FusionConfig)."""
        path = str(config) if isinstance(config, (str, Path)) else None
        return cls(engine=shared_engine(config), config_path=path, **fields)

    @property
    def client(self) -> FusionClient:
        return FusionClient(
            self.engine, self.router_threshold, self.max_experts, self.compose, self.compose_dir
        )

    @property
    def model_name(self) -> str:
        return self.engine.config.large.path

    def get_token_ids(self, text: str) -> list[int]:
        """`text` in the fused models' tokenizer, without special tokens (offline, no GPT-2).

        LangChain's text splitters, memory and message trimming count tokens through this.
        """
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _overrides(
        self, stop: str | list[str] | None, kwargs: dict[str, Any], chat_stops: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Engine keywords of one call: fields, then call keywords (routing keywords removed)."""
        check_keywords(kwargs, {*CALL_KEYWORD_NAMES, *self.extra_call_keywords})
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        params = {
            **{key: getattr(self, key) for key in SAMPLING_KEYWORDS},
            **{key: kwargs[key] for key in SAMPLING_KEYWORDS if key in kwargs},
            "max_new_tokens": max_tokens,
            "stop": stop_strings(self.stop, stop, kwargs.get("stop"), chat_stops),
        }
        return {k: v for k, v in params.items() if v is not None}

    def _routed_rows(
        self,
        prompt_of: Callable[[Any], str | FusionPrompt],
        payloads: Sequence[Any],
        run_managers: Sequence[CallbackManagerForLLMRun | None],
        overrides: dict[str, Any],
        kwargs: dict[str, Any],
        return_exceptions: bool,
    ) -> list[RoutedGeneration | Exception]:
        """Each row's prompt and route (from its own run), then one engine call per expert set.

        With `return_exceptions` a row whose prompt, route or generation fails gets its own error.
        """
        prepared: list[tuple[str | FusionPrompt, tuple[Route, Source]] | Exception] = []
        for payload, manager in zip(payloads, run_managers, strict=True):
            try:
                prepared.append((prompt_of(payload), self._route(kwargs, manager)))
            except Exception as err:
                if not return_exceptions:
                    raise
                prepared.append(err)
        ready = [row for row, item in enumerate(prepared) if not isinstance(item, Exception)]
        routed = (
            self.client.generate(
                [prepared[row][0] for row in ready],  # type: ignore[index]
                [prepared[row][1] for row in ready],  # type: ignore[index]
                return_exceptions=return_exceptions,
                **overrides,
            )
            if ready
            else []
        )
        results: list[Any] = list(prepared)
        for row, outcome in zip(ready, routed, strict=True):
            results[row] = outcome
        return results

    def _caches(self) -> bool:
        """Whether calls go through a LangChain cache (then `batch` invokes each input alone)."""
        return self.cache is not False and (self.cache is not None or get_llm_cache() is not None)

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
            "ls_max_tokens": kwargs.get(
                "max_tokens", kwargs.get("max_new_tokens", self.max_tokens)
            ),
            "ls_stop": stop_strings(self.stop, stop),
        }
        return {k: v for k, v in params.items() if v is not None}
