"""`batch` as ONE engine call per expert set, with a traced run and an outcome per input.

LangChain's default `batch` either sends every prompt to one `_generate` that sees only the first
input's run (`BaseLLM`) and copies one exception to every input, or runs one `_generate` per input
in threads (`BaseChatModel`). The engine decodes a whole batch in lock step, so batching here
starts every input's run, routes each input with its own tags and metadata, generates all rows
together and ends every run with its own result or its own error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import CallbackManager, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import _format_ls_structured_output
from langchain_core.outputs import LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list

if TYPE_CHECKING:
    from langchain_core.language_models import LanguageModelInput

    from .params import FusionFields


def batch_runs(
    model: FusionFields,
    inputs: list[LanguageModelInput],
    config: RunnableConfig | list[RunnableConfig] | None,
    return_exceptions: bool,
    kwargs: dict[str, Any],
) -> list[Any]:
    """Each input's output (or, with `return_exceptions`, its own exception), in order."""
    configs = get_config_list(config, len(inputs))
    kwargs = dict(kwargs)
    stop = kwargs.pop("stop", None)
    options = {
        "stop": stop,
        **_format_ls_structured_output(kwargs.pop("ls_structured_output_format", None)),
    }
    outputs: list[Any] = [None] * len(inputs)
    rows, payloads = [], []
    for row, value in enumerate(inputs):
        try:
            payloads.append(model._batch_payload(value))
            rows.append(row)
        except Exception as err:
            if not return_exceptions:
                raise
            outputs[row] = err
    managers = [
        _start_run(model, payload, configs[row], stop, options, kwargs, len(inputs))
        for row, payload in zip(rows, payloads, strict=True)
    ]
    try:
        results = model._generate_rows(payloads, stop, managers, return_exceptions, **kwargs)
    except BaseException as err:
        for manager in managers:
            manager.on_llm_error(err, response=LLMResult(generations=[]))
        raise
    for row, manager, result in zip(rows, managers, results, strict=True):
        if isinstance(result, Exception):
            manager.on_llm_error(result, response=LLMResult(generations=[]))
            outputs[row] = result
        else:
            run_result, outputs[row] = model._batch_output(result)
            manager.on_llm_end(run_result)
    return outputs


def _start_run(
    model: FusionFields,
    payload: Any,
    config: RunnableConfig,
    stop: Any,
    options: dict[str, Any],
    kwargs: dict[str, Any],
    batch_size: int,
) -> CallbackManagerForLLMRun:
    callback_manager = CallbackManager.configure(
        config.get("callbacks"),
        model.callbacks,
        model.verbose,
        config.get("tags"),
        model.tags,
        {**(config.get("metadata") or {}), **model._get_ls_params(stop=stop, **kwargs)},
        model.metadata,
    )
    return model._start_batch_run(
        callback_manager,
        payload,
        stop,
        kwargs,
        options=options,
        name=config.get("run_name"),
        run_id=config.get("run_id"),
        batch_size=batch_size,
    )
