"""The settings both adapters expose, defined once: the pydantic mixin `AdapterFields`.

`langchain_fusion_llm` and `llama_index.llms.fusion_llm` subclass it beside their framework's
base class, so a field, its default and its description cannot drift between them. Each adapter
adds only its ecosystem's own fields: the token limit under its ecosystem's name
(`token_limit_field`), LangChain's `streaming`, LlamaIndex's `context_window`.

The mixin also keeps the adapter's `FusionClient`, built once per instance in `__init__` (LangChain's
`configurable_fields` and LlamaIndex's unpickling construct through `__init__`, so a copy built
that way gets its own), and turns a call's keywords into engine keywords (`engine_keywords`; a chat
call's, with its tool choice's grammar and its turn's end: `chat_keywords`). No framework is
imported here.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from ..core.config import MAX_LOGPROBS, FusionConfig
from ..core.errors import ConfigError, RequestError
from ..engine import FusionEngine
from .chat import tool_call_constraint
from .client import FusionClient, shared_engine, stop_strings
from .router import CALL_KEYWORDS, Route

if TYPE_CHECKING:
    from typing_extensions import Self

SAMPLING_KEYWORDS = ("mode", "temperature", "top_k", "top_p", "seed")
TOKEN_LIMIT_NAMES = ("max_tokens", "max_new_tokens")  # LangChain's name, LlamaIndex's name
LOGPROB_KEYWORDS = ("logprobs", "top_logprobs")  # OpenAI's names, as both frameworks use them
# The grammar the output follows, handed to the engine as given: the engine's and OpenAI's name.
CONSTRAINT_KEYWORDS = ("structured_outputs", "response_format")
NO_CONSTRAINT = {"type": "text"}  # OpenAI's response_format for free text
# Call keywords every adapter takes; a typo of one is refused with a hint.
CALL_KEYWORD_NAMES = (
    *CALL_KEYWORDS, *SAMPLING_KEYWORDS, *TOKEN_LIMIT_NAMES, *LOGPROB_KEYWORDS,
    *CONSTRAINT_KEYWORDS, "stop",
)  # fmt: skip


def token_limit_field(name: str) -> Any:
    """The maximum number of new tokens, under `name` (one of TOKEN_LIMIT_NAMES) and the other."""
    other = next(n for n in TOKEN_LIMIT_NAMES if n != name)
    return Field(
        default=None,
        validation_alias=AliasChoices(name, other),
        description=f"Maximum number of new tokens, also accepted as `{other}` "
        "(None: the engine config's).",
    )


class AdapterFields(BaseModel):
    """The engine, routing and generation settings of a fusion-llm adapter.

    Routing for one call, first present wins (see `router.choose_route`): call keywords
    (`task`, `tasks`, `experts`), `fusion_tasks` in LangChain's run metadata or LlamaIndex's
    instrument tags, LangChain tags `task:<name>`, then the `route` field.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: FusionEngine | None = Field(
        default=None,
        repr=False,  # a tracer would receive the repr of every model
        exclude=True,
        description="The fusion engine (models load on first use); built from `config_path` "
        "when not given.",
    )
    config_path: str | None = Field(
        default=None,
        description="Fusion config file (YAML/TOML/JSON); adapters built from equal configs "
        "share one engine.",
    )
    route: Route = Field(
        default="all",
        description='Experts when no call keyword, metadata or tag names them: "all", "none", '
        '"auto", "examples" or task names.',
    )
    router_threshold: float = Field(
        default=0.0,
        description="`auto` routing: minimum log-likelihood gain per prompt token (nats) to "
        "activate an expert.",
    )
    max_experts: int | None = Field(
        default=None,
        description="`auto` routing: keep at most this many experts per prompt (None: no limit).",
    )
    compose: str = Field(
        default="logits",
        description='Several active experts combine by "logits" (joint alpha), "weights" '
        '(merged) or "both".',
    )
    compose_dir: str | None = Field(
        default=None,
        description='Where merged experts are written under compose="weights" (None: the temp '
        "directory).",
    )
    mode: str | None = Field(
        default=None,
        description='Fusion mode: "dynamic", "paper", "static" or "none" (None: the engine '
        "config's).",
    )
    temperature: float | None = Field(
        default=None, description="Sampling temperature; 0 is greedy (None: the engine config's)."
    )
    top_k: int | None = Field(
        default=None,
        description="Sample from the k most likely tokens only (None: the engine config's).",
    )
    top_p: float | None = Field(
        default=None, description="Nucleus sampling mass (None: the engine config's)."
    )
    seed: int | None = Field(
        default=None,
        description="Sampler seed; same seed, same output (None: the engine config's).",
    )
    stop: list[str] | None = Field(
        default=None,
        description="Stop strings (a bare string is one), cut from the output; a call's `stop` "
        "is added.",
    )
    logprobs: bool = Field(
        default=False,
        description="Return each generated token's log-probability under the fused distribution "
        "it was sampled from (before temperature, top-k and top-p).",
    )
    top_logprobs: int | None = Field(
        default=None,
        description=f"Also return this many most likely tokens per step (0-{MAX_LOGPROBS}; "
        "implies `logprobs`).",
    )

    # Call keywords this adapter takes besides CALL_KEYWORD_NAMES (e.g. a chat model's tools).
    extra_call_keywords: ClassVar[tuple[str, ...]] = ()

    _client: FusionClient | None = PrivateAttr(default=None)

    def __init__(self, **fields: Any) -> None:
        # The engine is resolved before pydantic validates: pydantic would wrap a ConfigError
        # raised inside a validator into a ValidationError.
        super().__init__(**with_engine(fields))
        self._client = FusionClient(
            self.engine, self.router_threshold, self.max_experts, self.compose, self.compose_dir
        )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @classmethod
    def from_engine(cls, engine: FusionEngine, **fields: Any) -> Self:
        """An adapter over an existing engine (adapters of both frameworks can share one)."""
        return cls(engine=engine, **fields)

    @classmethod
    def from_config(cls, config: FusionConfig | dict[str, Any] | str | Path, **fields: Any) -> Self:
        """An adapter over the shared engine of `config` (a file path, dict or FusionConfig)."""
        path = str(config) if isinstance(config, (str, Path)) else None
        return cls(engine=shared_engine(config), config_path=path, **fields)

    @property
    def client(self) -> FusionClient:
        """Routed generation over the engine, built once with this adapter."""
        if self._client is None:  # restored without `__init__` (unpickled without a config)
            msg = (
                f"this {type(self).__name__} has no engine (unpickled without a config_path); "
                "pass engine= or config_path="
            )
            raise ConfigError(msg)
        return self._client

    def engine_keywords(
        self, kwargs: Mapping[str, Any], max_new_tokens: int | None, *stops: Any
    ) -> dict[str, Any]:
        """Engine keywords of one call: the fields, overridden by the call's keywords, and the
        call's grammar (`structured_outputs` / `response_format`, as given: the engine checks it).

        `max_new_tokens`: the adapter's token-limit field (a call's `max_tokens` or
        `max_new_tokens` overrides it). `stops`: further stop strings (a call's `stop`
        argument, a chat turn's end), added to the field's and the call keyword's.
        """
        check_keywords(kwargs, {*CALL_KEYWORD_NAMES, *self.extra_call_keywords})
        limits = [kwargs.get(name) for name in TOKEN_LIMIT_NAMES]
        params = {
            **{key: getattr(self, key) for key in SAMPLING_KEYWORDS},
            **{key: kwargs[key] for key in SAMPLING_KEYWORDS if key in kwargs},
            "max_new_tokens": next((n for n in limits if n is not None), max_new_tokens),
            "stop": stop_strings(self.stop, kwargs.get("stop"), *stops),
            "logprobs": self._logprobs(kwargs),
            **{key: kwargs.get(key) for key in CONSTRAINT_KEYWORDS},
        }
        return {k: v for k, v in params.items() if v is not None}

    def chat_keywords(
        self, kwargs: Mapping[str, Any], max_new_tokens: int | None, *stops: Any
    ) -> dict[str, Any]:
        """Engine keywords of one chat call (`engine_keywords`), with its grammar and turn's end.

        The grammar: the call's `structured_outputs` / `response_format`, or the tool choice's
        over the offered `tools` (`tool_call_constraint`); a RequestError when both constrain.
        A grammar that shapes the whole reply (JSON, a forced call) ends it on EOS once complete,
        so the text that closes the chat turn (e.g. a newline, which JSON may hold) stops the
        reply only when it is free text (no grammar given, no call forced).
        """
        tool_choice = kwargs.get("tool_choice")
        tool_grammar = tool_call_constraint(
            list(kwargs.get("tools") or []), tool_choice, self.client.writes_tool_call_blocks()
        )
        given = [
            key
            for key in CONSTRAINT_KEYWORDS
            if kwargs.get(key) is not None and kwargs[key] != NO_CONSTRAINT
        ]
        if tool_grammar is not None and given:
            msg = (
                f"tool_choice={tool_choice!r} constrains the reply to tool calls; "
                f"{' and '.join(given)} cannot constrain it too: pass tool_choice='none' or "
                "no tools"
            )
            raise RequestError(msg)
        forced = tool_grammar is not None and tool_choice not in (None, False, "auto")
        turn_end = [] if given or forced else self.client.chat_stops()
        keywords = self.engine_keywords(kwargs, max_new_tokens, *stops, turn_end)
        return keywords | ({"structured_outputs": tool_grammar} if tool_grammar else {})

    def _logprobs(self, kwargs: Mapping[str, Any]) -> int | None:
        """The engine's `logprobs` (alternatives per token; None: off) from OpenAI's pair:
        `logprobs` switches them on, `top_logprobs` (which implies it) adds alternatives."""
        asked = kwargs.get("logprobs", self.logprobs)
        top = kwargs.get("top_logprobs", self.top_logprobs)
        return (top or 0) if asked or top is not None else None


def with_engine(fields: dict[str, Any]) -> dict[str, Any]:
    """An adapter's fields with its engine attached: `engine`, or the shared engine of
    `config_path` (kept as a string)."""
    engine, config_path = fields.get("engine"), fields.get("config_path")
    if isinstance(config_path, Path):
        config_path = fields["config_path"] = str(config_path)
    if engine is None:
        if config_path is None:
            msg = "give `engine=` (a FusionEngine) or `config_path=` (a fusion config file)"
            raise ConfigError(msg)
        fields["engine"] = shared_engine(config_path)
    return fields


def check_keywords(kwargs: Mapping[str, Any], accepted: Collection[str]) -> None:
    """Refuse call keywords an adapter does not know (a typo must not be silently ignored)."""
    for key in kwargs:
        if key in accepted:
            continue
        close = difflib.get_close_matches(key, sorted(accepted), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        msg = f"unknown call keyword {key!r}; {hint}accepted: {', '.join(sorted(accepted))}"
        raise RequestError(msg)
