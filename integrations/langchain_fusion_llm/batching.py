"""`ChatFusedLLM.batch` as ONE engine call per expert set, with a traced run per input.

LangChain's default chat `batch` runs one `_generate` per input (in threads); the engine decodes a
whole batch in lock step, so batching here starts every input's run, routes each input with its
own tags and metadata, generates all rows together and ends every run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import CallbackManager
from langchain_core.outputs import LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list

if TYPE_CHECKING:
    from langchain_core.language_models import LanguageModelInput
    from langchain_core.messages import BaseMessage

    from .chat_models import ChatFusedLLM


def batch_chat(
    model: ChatFusedLLM,
    inputs: list[LanguageModelInput],
    config: RunnableConfig | list[RunnableConfig] | None,
    return_exceptions: bool,
    kwargs: dict[str, Any],
) -> list[BaseMessage | Exception]:
    configs = get_config_list(config, len(inputs))
    message_lists = [model._convert_input(i).to_messages() for i in inputs]
    stop = kwargs.pop("stop", None)
    run_managers = [
        _start_run(model, messages, cfg, stop, kwargs, len(inputs))
        for messages, cfg in zip(message_lists, configs, strict=False)
    ]
    try:
        results = model._generate_rows(message_lists, stop, run_managers, **kwargs)
    except BaseException as err:
        for manager in run_managers:
            manager.on_llm_error(err, response=LLMResult(generations=[]))
        if return_exceptions and isinstance(err, Exception):
            return [err] * len(inputs)
        raise
    for manager, result in zip(run_managers, results, strict=False):
        manager.on_llm_end(
            LLMResult(generations=[result.generations], llm_output=result.llm_output)
        )
    return [result.generations[0].message for result in results]


def _start_run(model, messages, config: RunnableConfig, stop, kwargs, batch_size: int):
    callback_manager = CallbackManager.configure(
        config.get("callbacks"),
        model.callbacks,
        model.verbose,
        config.get("tags"),
        model.tags,
        {**(config.get("metadata") or {}), **model._get_ls_params(stop=stop, **kwargs)},
        model.metadata,
    )
    (run_manager,) = callback_manager.on_chat_model_start(
        model._serialized,
        [messages],
        invocation_params=model._get_invocation_params(stop=stop, **kwargs),
        options={"stop": stop},
        name=config.get("run_name"),
        run_id=config.get("run_id"),
        batch_size=batch_size,
    )
    return run_manager
