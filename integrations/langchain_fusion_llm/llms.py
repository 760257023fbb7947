"""`FusedLLM`: a LangChain text-completion model over a fusion engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseRunManager,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseLLM, LanguageModelInput
from langchain_core.messages import BaseMessage, get_buffer_string
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tracers._streaming import _StreamingCallbackHandler

from fusion_llm.engine import FusionPrompt, StreamChunk
from fusion_llm.routing.client import RoutedGeneration, iterate_in_thread
from fusion_llm.routing.router import RoutingDecision

from .batching import batch_runs
from .params import FusionFields

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


class FusedLLM(FusionFields, BaseLLM):
    """A large language model decoded with small task experts by dynamic logit fusion.

    >>> llm = FusedLLM(config_path="fusion.yaml")
    >>> llm.bind(task="math").invoke("Question: 2 + 3 = ?\\nAnswer:")

    `batch` routes each input by its own config and sends all inputs of one expert set to ONE
    engine call; each input gets its own result or error. See `langchain_fusion_llm.params` for
    the fields and the routing precedence.
    """

    @property
    def _llm_type(self) -> str:
        return "fusion-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._fusion_params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        return {"ls_model_type": "llm", **self._ls_fields(stop, kwargs)}

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if len(prompts) == 1 and self._streams_to(run_manager):
            return _merged(list(self._stream(prompts[0], stop, run_manager, **kwargs)))
        results = self._generate_rows(prompts, stop, [run_manager] * len(prompts), **kwargs)
        usage = {k: sum(r.llm_output["token_usage"][k] for r in results) for k in USAGE_KEYS}
        return LLMResult(
            generations=[r.generations[0] for r in results],
            llm_output={"token_usage": usage, "model_name": self.model_name},
        )

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if len(prompts) == 1 and self._streams_to(run_manager):
            return _merged(
                [c async for c in self._astream(prompts[0], stop, run_manager, **kwargs)]
            )
        sync_manager = run_manager.get_sync() if run_manager else None
        return await asyncio.to_thread(self._generate, prompts, stop, sync_manager, **kwargs)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        decision, pieces = self._start_stream(prompt, stop, run_manager, kwargs)
        try:
            for piece in pieces:
                chunk = _chunk(piece, decision)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            pieces.close()

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        sync_manager = run_manager.get_sync() if run_manager else None
        decision, pieces = await asyncio.to_thread(
            self._start_stream, prompt, stop, sync_manager, kwargs
        )
        async for piece in iterate_in_thread(pieces):
            chunk = _chunk(piece, decision)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str | Exception]:
        if len(inputs) < 2 or self._caches():  # one invoke per input keeps the cache per prompt
            return Runnable.batch(
                self, inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        return batch_runs(self, inputs, config, return_exceptions, kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str | Exception]:
        if len(inputs) < 2 or self._caches():
            return await Runnable.abatch(
                self, inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        return await asyncio.to_thread(batch_runs, self, inputs, config, return_exceptions, kwargs)

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt LangChain writes for the messages (a text model takes no tools)."""
        return self.client.count_prompt_tokens(FusionPrompt(get_buffer_string(messages)))

    # -- helpers ---------------------------------------------------------------------------
    def _start_stream(self, prompt, stop, run_manager, kwargs):
        route, source = self._route(kwargs, run_manager)
        return self.client.stream(prompt, route, source, **self._overrides(stop, kwargs))

    def _streams_to(self, run_manager: BaseRunManager | None) -> bool:
        handlers = run_manager.handlers if run_manager else []
        return self.streaming or any(isinstance(h, _StreamingCallbackHandler) for h in handlers)

    def _generate_rows(
        self,
        prompts: Sequence[str],
        stop: str | list[str] | None,
        run_managers: Sequence[CallbackManagerForLLMRun | None],
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[LLMResult | Exception]:
        """One single-prompt result (or error) per row; one engine batch per expert set."""
        overrides = self._overrides(stop, kwargs)
        routed = self._routed_rows(
            lambda prompt: prompt, prompts, run_managers, overrides, kwargs, return_exceptions
        )
        return [r if isinstance(r, Exception) else self._row_result(r) for r in routed]

    def _row_result(self, routed: RoutedGeneration) -> LLMResult:
        return LLMResult(
            generations=[[Generation(text=routed.generation.text, generation_info=routed.info)]],
            llm_output={"token_usage": routed.usage, "model_name": self.model_name},
        )

    def _batch_payload(self, value: LanguageModelInput) -> str:
        return self._convert_input(value).to_string()

    def _start_batch_run(
        self,
        callback_manager: CallbackManager,
        prompt: str,
        stop: Any,
        kwargs: dict[str, Any],
        **run: Any,
    ) -> CallbackManagerForLLMRun:
        params = {**self._dict_for_compat(), "stop": stop}
        (manager,) = callback_manager.on_llm_start(
            self._serialized, [prompt], invocation_params=params, **run
        )
        return manager

    def _batch_output(self, result: LLMResult) -> tuple[LLMResult, str]:
        return result, result.generations[0][0].text


def _chunk(piece: StreamChunk, decision: RoutingDecision) -> GenerationChunk:
    """A streamed piece; the last one carries the generation info."""
    if piece.generation is None:
        return GenerationChunk(text=piece.text)
    return GenerationChunk(
        text=piece.text, generation_info=RoutedGeneration(piece.generation, decision).info
    )


def _merged(chunks: list[GenerationChunk]) -> LLMResult:
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    generation = Generation(text=merged.text, generation_info=merged.generation_info)
    info = merged.generation_info or {}
    usage = {k: info[k] for k in USAGE_KEYS if k in info}
    return LLMResult(generations=[[generation]], llm_output={"token_usage": usage})
