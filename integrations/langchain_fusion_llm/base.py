"""What `FusedLLM` and `ChatFusedLLM` share: routing from the run, parameters, tracing, batches.

The fields both frameworks expose live in `fusion_llm.routing.fields.AdapterFields`; LangChain
adds `max_tokens` (alias `max_new_tokens`). No fusion logic here.

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
`top_k`, `top_p`, `seed`, `mode`, `stop` (a bare string is one stop string), `logprobs`,
`top_logprobs`, and a grammar the output follows: `structured_outputs` (the engine's: `{"json":
schema}`, `{"regex": ...}`, `{"choice": [...]}`, `{"grammar": ...}`, `{"json_object": True}`,
`{"structural_tag": ...}`) or OpenAI's `response_format`; the chat model adds `tools` and
`tool_choice`. Any other keyword is refused with a typed `RequestError` (a typo must not silently
fall back to a default).

Log-probabilities (`logprobs=True`, `top_logprobs=k`, as fields, bound or passed) come in OpenAI's
shape (`fusion_llm.routing.client.openai_logprobs`) under the key "logprobs": in a chat message's
`response_metadata` and a generation's `generation_info`; each streamed chunk carries the entries
of its own tokens, so merged chunks hold every token's once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManager, CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import LanguageModelInput
from langchain_core.load import dumpd
from langchain_core.outputs import LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import get_config_list

from fusion_llm import FusionPrompt
from fusion_llm.engine import TokenLogprob
from fusion_llm.routing.client import RoutedGeneration, openai_logprobs, stop_strings
from fusion_llm.routing.fields import AdapterFields, token_limit_field
from fusion_llm.routing.router import Route, Source, choose_route

PROVIDER = "fusion_llm"
# Bound by `with_structured_output`: LangChain formats it for tracing in its own per-call path.
STRUCTURED_OUTPUT_KEYWORD = "ls_structured_output_format"


class FusionLanguageModel(AdapterFields):
    """The LangChain side of both fusion models (listed before LangChain's base class).

    `batch` decodes all inputs of one expert set in ONE engine call, while each input keeps its
    own traced run, its own route (from its own config's tags and metadata) and its own result or
    error. LangChain's default either hands every prompt to one `_generate` that sees only the
    first input's run and copies one exception to every input (`BaseLLM`), or runs one
    `_generate` per input in threads (`BaseChatModel`). Each model supplies the batch's hooks:
    `_batch_payload` (an input as its prompt), `_run_starter` (its run's start event),
    `_generate_rows` (one result or error per row) and `_batch_output`.
    """

    max_tokens: int | None = token_limit_field("max_tokens")

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

    # -- batches -------------------------------------------------------------------------------
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        if self._invokes_alone(inputs, kwargs):
            return Runnable.batch(
                self, inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        return self._batch_together(inputs, config, return_exceptions, kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        if self._invokes_alone(inputs, kwargs):
            return await Runnable.abatch(
                self, inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        return await asyncio.to_thread(
            self._batch_together, inputs, config, return_exceptions, kwargs
        )

    def _invokes_alone(self, inputs: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        """Whether a batch runs as one invoke per input: a single input, a LangChain cache
        (looked up per prompt), or a structured-output binding (traced per call)."""
        caches = self.cache is not False and (self.cache is not None or get_llm_cache() is not None)
        return len(inputs) < 2 or caches or STRUCTURED_OUTPUT_KEYWORD in kwargs

    def _batch_together(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None,
        return_exceptions: bool,
        kwargs: dict[str, Any],
    ) -> list[Any]:
        """Each input's output (or, with `return_exceptions`, its own exception), in order."""
        configs = get_config_list(config, len(inputs))
        kwargs = dict(kwargs)
        stop = kwargs.pop("stop", None)
        outputs: list[Any] = [None] * len(inputs)
        rows, payloads, runs = [], [], []
        for row, value in enumerate(inputs):
            try:
                payload = self._batch_payload(value)
            except Exception as err:
                if not return_exceptions:
                    raise
                outputs[row] = err
                continue
            rows.append(row)
            payloads.append(payload)
            runs.append(self._start_run(payload, configs[row], stop, kwargs, len(inputs)))
        try:
            results = self._generate_rows(payloads, stop, runs, kwargs, return_exceptions)
        except BaseException as err:
            for run in runs:
                run.on_llm_error(err, response=LLMResult(generations=[]))
            raise
        for row, run, result in zip(rows, runs, results, strict=True):
            if isinstance(result, Exception):
                run.on_llm_error(result, response=LLMResult(generations=[]))
                outputs[row] = result
            else:
                run_result, outputs[row] = self._batch_output(result)
                run.on_llm_end(run_result)
        return outputs

    def _start_run(
        self,
        payload: Any,
        config: RunnableConfig,
        stop: list[str] | None,
        kwargs: dict[str, Any],
        batch_size: int,
    ) -> CallbackManagerForLLMRun:
        """One input's traced run, configured as LangChain configures an invoke's."""
        callbacks = CallbackManager.configure(
            inheritable_callbacks=config.get("callbacks"),
            local_callbacks=self.callbacks,
            verbose=self.verbose,
            inheritable_tags=config.get("tags"),
            local_tags=self.tags,
            inheritable_metadata={
                **(config.get("metadata") or {}),
                **self._get_ls_params(stop=stop, **kwargs),
            },
            local_metadata=self.metadata,
        )
        params = {**self._identifying_params, "_type": self._llm_type, "stop": stop, **kwargs}
        start = self._run_starter(callbacks)
        (run,) = start(
            dumpd(self),
            [payload],
            invocation_params=params,
            options={"stop": stop},
            name=config.get("run_name"),
            run_id=config.get("run_id"),
            batch_size=batch_size,
        )
        return run

    # -- one engine call per expert set --------------------------------------------------------
    def _route(
        self, kwargs: dict[str, Any], run_manager: CallbackManagerForLLMRun | None
    ) -> tuple[Route, Source]:
        metadata = run_manager.metadata if run_manager else None
        tags = run_manager.tags if run_manager else None
        return choose_route(kwargs, metadata, tags, self.route)

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

    # -- identification and tracing ------------------------------------------------------------
    @property
    def _identifying_params(self) -> dict[str, Any]:
        """The LangChain cache key: models, experts, fusion mode, routing and generation settings."""
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
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
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


def logprobs_info(entries: list[TokenLogprob] | None) -> dict[str, Any]:
    """`{"logprobs": <OpenAI's shape>}` when the call asked for log-probabilities, else {}."""
    return {} if entries is None else {"logprobs": openai_logprobs(entries)}
