"""Which experts are active for one LLM call (one chain step): explicit hints or the prompt itself.

A *route* names the experts of a call: a list of task names (a task is named after its expert), or
one of the keywords

    "all"   every configured expert (the engine's default),
    "none"  the large model alone,
    "auto"        per prompt: `examples` when every expert has example prompts (its config's
                  `examples`, or its card's, which `fusion-llm train-expert` writes), else
                  `likelihood`;
    "examples"    the expert whose example prompts are nearest, per prompt;
    "likelihood"  the likelihood-ratio router below picks, per prompt.

Measured on the shipped family (`cookbooks/router_accuracy.py`), `examples` puts the right expert
first for every prompt and `likelihood` for a quarter of them: `auto` prefers the one that works.

Explicit hints, strongest first (the first one present wins; the others are ignored):

    1. call      keyword arguments of the call, including bound ones: `experts=`, `tasks=`, `task=`
                 (LangChain `llm.bind(task="math")`, LlamaIndex `llm.complete(p, tasks=[...])`);
    2. metadata  `fusion_tasks` in the run metadata (LangChain `with_config(metadata=...)`) or in the
                 LlamaIndex instrument tags (`instrument_tags({"fusion_tasks": [...]})`);
    3. tags      LangChain run tags `task:<name>` (all of them, in order);
    4. default   the adapter's `route` field ("all" unless set).

Automatic routing scores each prompt under the small base S and every expert t (LoRA experts as
rows of one peft forward, full experts in their own forward) and activates the experts whose mean
per-token log-likelihood gain passes a threshold:

    gain_t = 1/(n-1) * sum_{i=2..n} [ log p_t(x_i | x_<i) - log p_S(x_i | x_<i) ]   (nats per token)

Experts with gain_t > threshold are kept, best first, at most `max_experts`; none -> large alone.

The gate (`FusionConfig.gate`) then reads each chosen expert's verdict (its card, written by
`fusion-llm gate`: does fusing it raise the teacher-forced likelihood of validation references over
the large model alone?). Under `enforce` an expert whose fusion lowers it is never activated, under
`warn` it is activated with a warning; either way the decision lists it.

The example router embeds prompts with the small base itself (mean of its last hidden states,
L2-normalised; no extra model) and picks the one expert whose mean example embedding has the
highest cosine similarity with the prompt's.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from peft import PeftModel

from ..core.errors import RequestError, UnknownExpertError
from ..core.padding import padded
from ..engine import FusionEngine, FusionPrompt
from ..runtime.models import BASE_ADAPTER, LoadedModel
from ..runtime.validation import fit_to_window
from .card import expert_examples, verdict

TASKS_METADATA_KEY = "fusion_tasks"  # run metadata / instrument tag naming the route
TASK_TAG_PREFIX = "task:"  # LangChain run tag naming one task
CALL_KEYWORDS = ("experts", "tasks", "task")  # call keywords naming the route, strongest first
KEYWORDS = ("all", "none", "auto", "examples", "likelihood")

Route = str | list[str]  # one of KEYWORDS, or task names
Source = Literal["call", "metadata", "tags", "default"]


@dataclass(frozen=True)
class RoutingDecision:
    """The experts active for one prompt, and why."""

    experts: list[str]  # [] means the large model alone
    source: Source  # where the route came from
    route: Route  # the route as given ("auto", "all", "none" or task names)
    # likelihood: each expert's gain over the small base (nats per prompt token); examples: similarity
    scores: dict[str, float] = field(default_factory=dict)
    scored_by: str = ""  # what `auto` scored with: "examples" or "likelihood"
    # gate: experts whose verdict says fusion does not help -> their gain (or, when the gain is
    # positive, their specificity: right answers minus other rows' answers; see experts/gate.py)
    refused: dict[str, float] = field(default_factory=dict)  # enforce: left out
    warned: dict[str, float] = field(default_factory=dict)  # warn: kept

    @property
    def reason(self) -> str:
        """One line for traces, e.g. `auto via metadata: math (gains math +0.412, qa -0.050)`."""
        chosen = ", ".join(self.experts) or "large model alone"
        route = _route_text(self.route) + (f" [{self.scored_by}]" if self.scored_by else "")
        text = f"{route} via {self.source}: {chosen}"
        if self.scores:
            label = "similarities" if (self.scored_by or self.route) == "examples" else "gains"
            scores = ", ".join(f"{name} {score:+.3f}" for name, score in self.scores.items())
            text += f" ({label} {scores})"
        for action, experts in (("refused", self.refused), ("warns about", self.warned)):
            if experts:
                listed = ", ".join(f"{n} ({g:+.3f} nats/token)" for n, g in experts.items())
                text += (
                    f"; gate {action} {listed}: fusing lowers the validation likelihood, or "
                    "raises other rows' answers more than the right ones"
                )
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "experts": list(self.experts),
            "source": self.source,
            "route": self.route,
            "scores": dict(self.scores),
            "scored_by": self.scored_by,
            "refused": dict(self.refused),
            "warned": dict(self.warned),
            "reason": self.reason,
        }


# -- explicit hints ----------------------------------------------------------------------------
def normalize_route(value: Any) -> Route:
    """A route from a user value: a keyword, one task name, or a sequence of task names.

    "none", [] and () all mean the large model alone; names keep their order, duplicates dropped.
    """
    if isinstance(value, str):
        value = value.strip()
        if value in KEYWORDS:
            return value
        return [value] if value else "none"
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        names = list(dict.fromkeys(str(v).strip() for v in value))
        if any(n in KEYWORDS for n in names):
            msg = f"route {names!r} mixes task names with a keyword; use one of {', '.join(KEYWORDS)} alone or only task names"
            raise RequestError(msg)
        return names or "none"
    msg = f"a route must be a task name, a list of task names or one of {', '.join(KEYWORDS)}; got {value!r}"
    raise RequestError(msg)


def route_from_call(kwargs: Mapping[str, Any]) -> Route | None:
    """The route named by call keywords (`experts=`, `tasks=`, `task=`), or None."""
    for key in CALL_KEYWORDS:
        if kwargs.get(key) is not None:
            return normalize_route(kwargs[key])
    return None


def route_from_tags(tags: Iterable[str] | None) -> list[str] | None:
    """Task names from `task:<name>` tags, in order, or None when there is none."""
    names = [t[len(TASK_TAG_PREFIX) :] for t in tags or () if t.startswith(TASK_TAG_PREFIX)]
    return list(dict.fromkeys(names)) or None


def choose_route(
    call: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    tags: Iterable[str] | None,
    default: Any = "all",
) -> tuple[Route, Source]:
    """The strongest explicit route present: call > metadata > tags > default."""
    if (route := route_from_call(call)) is not None:
        return route, "call"
    if metadata and metadata.get(TASKS_METADATA_KEY) is not None:
        return normalize_route(metadata[TASKS_METADATA_KEY]), "metadata"
    if (route := route_from_tags(tags)) is not None:
        return route, "tags"
    return normalize_route(default), "default"


# Example embeddings per engine, computed on first use (an engine's config is immutable).
_example_centroids: weakref.WeakKeyDictionary[FusionEngine, dict[str, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


# -- the router --------------------------------------------------------------------------------
class TaskRouter:
    """Turns a route into the experts of each prompt; `auto` scores prompts by likelihood ratio.

    `threshold`: minimum gain (nats per prompt token) for `auto` to activate an expert.
    `max_experts`: keep at most this many experts per prompt under `auto` (None: no limit).
    """

    def __init__(
        self, engine: FusionEngine, threshold: float = 0.0, max_experts: int | None = None
    ):
        if max_experts is not None and max_experts < 1:
            msg = f"max_experts must be at least 1 or None, got {max_experts}"
            raise RequestError(msg)
        self.engine = engine
        self.threshold = threshold
        self.max_experts = max_experts

    def decide(
        self, prompts: Sequence[FusionPrompt], route: Route, source: Source
    ) -> list[RoutingDecision]:
        """One decision per prompt, after the gate."""
        return [self._gated(d) for d in self._decide(prompts, route, source)]

    def _decide(
        self, prompts: Sequence[FusionPrompt], route: Route, source: Source
    ) -> list[RoutingDecision]:
        if route == "auto":
            scored_by = "examples" if self._every_expert_has_examples() else "likelihood"
            decisions = self._decide(prompts, scored_by, source)
            return [replace(d, route="auto", scored_by=scored_by) for d in decisions]
        if route == "likelihood":
            return [self._pick(row, source) for row in self.gains(prompts)]
        if route == "examples":
            return [self._nearest(row, source) for row in self.similarities(prompts)]
        experts = self._explicit_experts(route)
        return [RoutingDecision(experts, source, route) for _ in prompts]

    def _every_expert_has_examples(self) -> bool:
        experts = self.engine.config.experts
        return bool(experts) and all(expert_examples(e) for e in experts)

    def _gated(self, decision: RoutingDecision) -> RoutingDecision:
        """The decision under the config's gate (off | warn | enforce)."""
        config = self.engine.config
        if config.gate == "off" or not decision.experts:
            return decision
        specs = {e.name: e for e in config.experts}
        hurting = {}
        for name in decision.experts:
            measured = verdict(specs[name], config.large)
            if measured is not None and not measured["helps"]:
                # the failing number: the likelihood gain, else (gain >= 0) the specificity
                low = measured["gain"] < 0 or measured.get("specificity") is None
                hurting[name] = measured["gain"] if low else measured["specificity"]
        if not hurting:
            return decision
        if config.gate == "warn":
            decision = replace(decision, warned=hurting)
            warnings.warn(
                decision.reason + " (gate: warn; set gate: enforce to refuse)", stacklevel=3
            )
            return decision
        kept = [e for e in decision.experts if e not in hurting]
        return replace(decision, experts=kept, refused=hurting)

    def gains(self, prompts: Sequence[FusionPrompt]) -> list[dict[str, float]]:
        """Per-token log-likelihood gain of every expert over the small base, one dict per prompt."""
        if not self.engine.expert_names:
            return [{} for _ in prompts]
        models = self.engine.models
        # Generation shares these models (and peft's per-row adapter hooks): hold the engine's lock.
        with self.engine.exclusive():
            table = prompt_gains(models.small, models.lora_experts, models.full_experts, prompts)
        return [
            {name: round(float(table[name][row]), 4) for name in self.engine.expert_names}
            for row in range(len(prompts))
        ]

    def similarities(self, prompts: Sequence[FusionPrompt]) -> list[dict[str, float]]:
        """Cosine similarity of each prompt to each expert's example prompts, one dict per prompt."""
        centroids = self._example_centroids()
        with self.engine.exclusive():  # the models are shared with generation
            embedded = prompt_embeddings(self.engine.models.small, prompts)  # [B, H]
        table = embedded @ torch.stack(list(centroids.values())).T  # [B, T]
        return [
            {name: round(float(table[row, t]), 4) for t, name in enumerate(centroids)}
            for row in range(len(prompts))
        ]

    def _example_centroids(self) -> dict[str, torch.Tensor]:
        """{expert: mean embedding of its examples, normalised}; computed once per engine."""
        if self.engine not in _example_centroids:
            examples = {e.name: expert_examples(e) for e in self.engine.config.experts}
            examples = {name: prompts for name, prompts in examples.items() if prompts}
            if not examples:
                msg = (
                    "route 'examples' needs example prompts: set `examples` on the experts in the "
                    "config, or train them with `fusion-llm train-expert`, which writes them"
                )
                raise RequestError(msg)
            with self.engine.exclusive():
                small = self.engine.models.small
                _example_centroids[self.engine] = {
                    name: _unit(
                        prompt_embeddings(small, [FusionPrompt(e) for e in prompts]).mean(0)
                    )
                    for name, prompts in examples.items()
                }
        return _example_centroids[self.engine]

    def _pick(self, gains: dict[str, float], source: Source) -> RoutingDecision:
        passing = [name for name, gain in gains.items() if gain > self.threshold]
        chosen = sorted(passing, key=lambda name: -gains[name])  # stable on ties
        return RoutingDecision(chosen[: self.max_experts], source, "likelihood", gains)

    def _nearest(self, similarities: dict[str, float], source: Source) -> RoutingDecision:
        best = max(similarities, key=similarities.get)
        return RoutingDecision([best], source, "examples", similarities)

    def _explicit_experts(self, route: Route) -> list[str]:
        if route == "all":
            return list(self.engine.expert_names)
        if route == "none":
            return []
        unknown = [n for n in route if n not in self.engine.expert_names]
        if unknown:
            known = ", ".join(self.engine.expert_names) or "none configured"
            msg = f"unknown task(s) {', '.join(map(repr, unknown))}; a task is named after its expert: {known}"
            raise UnknownExpertError(msg)
        return list(route)


def routing_accuracy(
    router: TaskRouter,
    labelled: Mapping[str, Sequence[str]],
    batch_size: int = 16,
    route: Literal["auto", "examples", "likelihood"] = "auto",
) -> dict[str, dict[str, float]]:
    """How well an automatic route (`auto`, `examples` or `likelihood`) routes prompts labelled
    with their task (= the expert that should win), before the gate.

    Per task and overall: `top1` (the task's expert has the best score), `selected` (it is among
    the experts chosen) and `exact` (it is the only expert chosen).
    """
    rows: dict[str, list[tuple[bool, bool, bool]]] = {}
    for task, prompts in labelled.items():
        for start in range(0, len(prompts), batch_size):
            chunk = [FusionPrompt(p) for p in prompts[start : start + batch_size]]
            for decision in router._decide(chunk, route, "default"):
                top = max(decision.scores, key=decision.scores.get)
                hits = (top == task, task in decision.experts, decision.experts == [task])
                rows.setdefault(task, []).append(hits)
    everything = [hit for hits in rows.values() for hit in hits]
    return {
        name: {
            metric: round(sum(h[i] for h in hits) / len(hits), 4)
            for i, metric in enumerate(("top1", "selected", "exact"))
        }
        for name, hits in {**rows, "all": everything}.items()
        if hits
    }


# -- likelihood scoring (tensor math) -----------------------------------------------------------
@torch.no_grad()
def prompt_gains(
    small: LoadedModel,
    lora_experts: Mapping[str, str],
    full_experts: Mapping[str, LoadedModel],
    prompts: Sequence[FusionPrompt],
) -> dict[str, torch.Tensor]:
    """{expert: [B] gain over the small base}; LoRA experts (name -> peft adapter name) share one
    forward with the base."""
    small_ids = [_encode(small, p.small or p.text, p) for p in prompts]
    batch = len(prompts)
    if lora_experts:
        adapters = [BASE_ADAPTER, *lora_experts.values()]
        scores = mean_log_likelihood(
            small, small_ids * len(adapters), [a for a in adapters for _ in range(batch)]
        ).view(len(adapters), batch)  # [1 + L, B]
        base = scores[0]
        gains = {name: scores[1 + k] - base for k, name in enumerate(lora_experts)}
    else:
        base = mean_log_likelihood(small, small_ids)  # [B]
        gains = {}
    for name, expert in full_experts.items():
        ids = [_encode(expert, p.experts.get(name, p.small or p.text), p) for p in prompts]
        gains[name] = mean_log_likelihood(expert, ids).to(base.device) - base
    return gains


def mean_log_likelihood(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], adapter_names: list[str] | None = None
) -> torch.Tensor:
    """Mean log p(x_i | x_<i) over tokens 2..n of each prompt ([N]); 0 for one-token prompts.

    Right padding, so positions need no correction; `adapter_names` selects a LoRA adapter per row.
    """
    ids, mask = _right_padded(loaded, prompts)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    logits = loaded.model(input_ids=ids, attention_mask=mask, **extra).logits  # [N, L, V]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, L-1, V]
    token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # [N, L-1]
    counted = mask[:, 1:].float()  # [N, L-1]
    return (token_logp * counted).sum(-1) / counted.sum(-1).clamp(min=1)


@torch.no_grad()
def prompt_embeddings(small: LoadedModel, prompts: Sequence[FusionPrompt]) -> torch.Tensor:
    """Mean of the small base's last hidden states over each prompt's tokens, L2-normalised [N, H]."""
    ids, mask = _right_padded(small, [_encode(small, p.small or p.text, p) for p in prompts])
    # A PeftModel would apply its active adapter; "__base__" rows run the small base itself.
    extra = (
        {"adapter_names": [BASE_ADAPTER] * len(prompts)}
        if isinstance(small.model, PeftModel)
        else {}
    )
    out = small.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **extra)
    hidden = out.hidden_states[-1].float()  # [N, L, H]
    weights = mask[..., None].float()  # [N, L, 1]
    return _unit((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, dim=-1)


def _right_padded(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each [N, L], right-padded, on the model's input device."""
    ids, mask = padded(prompts, loaded.tokenizer.pad_token_id, side="right")
    return ids.to(loaded.input_device), mask.to(loaded.input_device)


def _encode(loaded: LoadedModel, text: str, prompt: FusionPrompt) -> list[int]:
    """The prompt's ids as `loaded` reads them; a prompt over its window keeps its end, which is
    what a routing score reads (`fit_to_window`, nothing reserved)."""
    ids = loaded.tokenizer(text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    return fit_to_window(ids, loaded.context_window, 0, truncate=True, reader=loaded.name)


def _route_text(route: Route) -> str:
    return route if isinstance(route, str) else "tasks " + ", ".join(route)
