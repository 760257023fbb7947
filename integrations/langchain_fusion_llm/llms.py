"""`FusedLLM`: a LangChain text-completion model over a fusion engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseRunManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseLLM, LanguageModelInput
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list
from langchain_core.tracers._streaming import _StreamingCallbackHandler

from fusion_llm.client import RoutedGeneration, iterate_in_thread
from fusion_llm.engine import StreamChunk
from fusion_llm.router import RoutingDecision, choose_route

from .params import FusionFields


class FusedLLM(FusionFields, BaseLLM):
    """A large language model decoded with small task experts by dynamic logit fusion.

    >>> llm = FusedLLM(config_path="fusion.yaml")
    >>> llm.bind(task="math").invoke("Question: 2 + 3 = ?\\nAnswer:")

    `batch` sends all prompts of one route to ONE engine call. See `langchain_fusion_llm.params`
    for the fields and the routing precedence.
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
        route = self._route(kwargs, run_manager)
        results = self.client.generate(
            prompts, [route] * len(prompts), **self._overrides(stop, kwargs)
        )
        return self._result(results)

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
        """One engine batch per route: only the first input's tags reach `_generate`."""
        configs = get_config_list(config, len(inputs))
        outputs: list[Any] = [None] * len(inputs)
        for rows in self._rows_by_route(configs):
            group = super().batch(
                [inputs[r] for r in rows],
                [configs[r] for r in rows],
                return_exceptions=return_exceptions,
                **kwargs,
            )
            for row, output in zip(rows, group, strict=False):
                outputs[row] = output
        return outputs

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str | Exception]:
        configs = get_config_list(config, len(inputs))
        outputs: list[Any] = [None] * len(inputs)
        for rows in self._rows_by_route(configs):
            group = await super().abatch(
                [inputs[r] for r in rows],
                [configs[r] for r in rows],
                return_exceptions=return_exceptions,
                **kwargs,
            )
            for row, output in zip(rows, group, strict=False):
                outputs[row] = output
        return outputs

    # -- helpers ---------------------------------------------------------------------------
    def _start_stream(self, prompt, stop, run_manager, kwargs):
        route, source = self._route(kwargs, run_manager)
        return self.client.stream(prompt, route, source, **self._overrides(stop, kwargs))

    def _streams_to(self, run_manager: BaseRunManager | None) -> bool:
        handlers = run_manager.handlers if run_manager else []
        return self.streaming or any(isinstance(h, _StreamingCallbackHandler) for h in handlers)

    def _rows_by_route(self, configs: list[RunnableConfig]) -> list[list[int]]:
        groups: dict[str, list[int]] = {}
        for row, config in enumerate(configs):
            route = choose_route({}, config.get("metadata"), config.get("tags"), self.route)
            groups.setdefault(repr(route), []).append(row)
        return list(groups.values())

    def _result(self, results: list[RoutedGeneration]) -> LLMResult:
        usage = {
            key: sum(r.usage[key] for r in results)
            for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        return LLMResult(
            generations=[
                [Generation(text=r.generation.text, generation_info=r.info)] for r in results
            ],
            llm_output={"token_usage": usage, "model_name": self.model_name},
        )


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
    usage = {
        k: info[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in info
    }
    return LLMResult(generations=[[generation]], llm_output={"token_usage": usage})
