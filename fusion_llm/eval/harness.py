"""A fused model for lm-evaluation-harness: `lm_eval.simple_evaluate(model=FusionLM(...))`.

Needs the `lm-eval` extra; nothing else in fusion_llm imports this module. The model is registered
as `fusion-llm`; lm-eval's command line finds it when this module is the entry point, which
registers it and hands the arguments to lm-eval's own CLI:

    python -m fusion_llm.eval.harness run --model fusion-llm \\
        --model_args config=fusion.yaml,experts=math+trivia,mode=dynamic --tasks arc_easy

Request types, each answered by the engine (no fusion logic here):
- loglikelihood (context, continuation): `FusionEngine.score` (total, is_greedy); an empty context
  reads the prefix token (BOS, else EOS) as lm-eval's HF model does;
- loglikelihood_rolling (text,): the score of the whole text after the prefix token, in one window
  (a text longer than the context window raises `ContextWindowError`);
- generate_until (context, gen_kwargs): `FusionEngine.generate` with stop = `until`,
  max_new_tokens = `max_gen_toks`, greedy unless `do_sample`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..core.errors import RequestError
from ..engine import FusionEngine, FusionPrompt

# lm-eval's generation keywords the engine honours (`do_sample` false: greedy)
GENERATION_KEYWORDS = frozenset(
    {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed"}
)


@register_model("fusion-llm")
class FusionLM(LM):
    """lm-eval's model interface over one `FusionEngine`.

    `config`: a fusion config (path, dict, FusionConfig) or an engine; `experts`: the experts to
    fuse (None: all configured; a string may join names with "+", for `--model_args`); `mode`:
    the fusion mode (None: the config's); `batch_size`: requests per engine call.
    """

    def __init__(
        self,
        config: str | Path | dict | FusionEngine,
        experts: str | Sequence[str] | None = None,
        mode: str | None = None,
        batch_size: int | str = 8,
        **_lm_eval_options: Any,  # device, max_length, ... that lm-eval passes to every model
    ):
        super().__init__()
        self.engine = config if isinstance(config, FusionEngine) else FusionEngine(config)
        self.experts = experts.split("+") if isinstance(experts, str) else experts
        self.mode = mode
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(self._prompt(context), continuation) for context, continuation in _args(requests)]
        scores = self._score(pairs, "loglikelihood", disable_tqdm)
        results = [(s.total, s.is_greedy) for s in scores]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs = [(self._prompt(""), text) for (text,) in _args(requests)]
        results = [s.total for s in self._score(pairs, "loglikelihood_rolling", disable_tqdm)]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # one engine call per distinct set of settings
        for i, (_, gen_kwargs) in enumerate(_args(requests)):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        for members in tqdm(groups.values(), desc="generate_until", disable=disable_tqdm):
            settings = _generation_settings(requests[members[0]].args[1])
            for start in range(0, len(members), self.batch_size):
                rows = members[start : start + self.batch_size]
                generations = self.engine.generate(
                    [requests[i].args[0] for i in rows],
                    experts=self.experts,
                    mode=self.mode,
                    **settings,
                )
                for i, generation in zip(rows, generations, strict=True):
                    results[i] = generation.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, generation.text)
        return results

    def _score(self, pairs, desc: str, disable_tqdm: bool):
        scores = []
        starts = range(0, len(pairs), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=disable_tqdm):
            prompts, continuations = zip(*pairs[start : start + self.batch_size], strict=True)
            scores += self.engine.score(
                list(prompts), list(continuations), experts=self.experts, mode=self.mode
            )
        return scores

    def _prompt(self, context: str) -> FusionPrompt:
        """The context as `generate` reads it; an empty one is the prefix token (BOS, else EOS)."""
        if context:
            return FusionPrompt(context)
        tokenizer = self.engine.tokenizer
        return FusionPrompt(tokenizer.bos_token or tokenizer.eos_token, add_special_tokens=False)


def _args(requests) -> list[tuple]:
    return [request.args for request in requests]


def _generation_settings(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's generation keywords as `GenerationSpec` overrides; one the engine cannot honour
    is refused (a task must not silently run with other settings than it asked for)."""
    unknown = sorted(set(gen_kwargs) - GENERATION_KEYWORDS)
    if unknown:
        msg = (
            f"generate_until: generation keyword(s) {', '.join(unknown)} are not supported by "
            f"fusion-llm; supported: {', '.join(sorted(GENERATION_KEYWORDS))}"
        )
        raise RequestError(msg)
    until = gen_kwargs.get("until") or []
    settings: dict[str, Any] = {"stop": [until] if isinstance(until, str) else list(until)}
    if "max_gen_toks" in gen_kwargs:
        settings["max_new_tokens"] = int(gen_kwargs["max_gen_toks"])
    if gen_kwargs.get("do_sample"):
        for key in ("temperature", "top_k", "top_p", "seed"):
            if key in gen_kwargs:
                settings[key] = gen_kwargs[key]
    else:
        settings["temperature"] = 0.0
    return settings


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
