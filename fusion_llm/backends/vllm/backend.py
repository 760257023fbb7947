"""VllmDecoder: the engine's decoder on vLLM (`backend: vllm`), under the contract and fault policy
of `runtime.decoder` that the HF backend's continuous batcher follows too.

Every row of a request becomes one vLLM request; one thread adds what arrived, steps vLLM's engine
(its scheduler batches continuously over paged KV caches) and turns each output into the row events
the engine facade already assembles (`request.RowEvent`), so `generate`, `stream`, `agenerate`,
`astream`, per-row experts and the adapters work unchanged. vLLM's engine core and executor run in
this process (one device), so the fusion processor's trace (alpha, fallback, fault) reaches each
event through the row's channel; with several devices (tensor parallelism) the workers are
processes and alpha reads as empty.

Under tensor parallelism (`vllm.tensor_parallel_size` n > 1) each rank is a worker process
holding 1/n of the large model's attention heads and MLP columns (and their KV cache). vLLM
all-gathers the logits (`Platform.use_all_gather`, true on CPU and CUDA), so every rank's sampler
sees the whole step, [rows, V], and runs every logits processor over all rows: each rank's fusion
processor loads the small base and experts and runs them on every fused row, the same work on
every rank (nothing is split), and each rank samples the same tokens (same logits, same seeds);
the first rank's output is returned (`MultiprocExecutor._get_output_rank`). The row channels
stay in this process, so there the small models read the large model's prompt ids (not a
rendering of their own) and no alpha is recorded.

Where this decoder differs from the batcher, vLLM forces it:
    - a fault in a shared step fails every request of the step: vLLM's scheduler and model runner
      hold the step's state, and a request cannot be replayed from a step alone;
    - a row without a finite large-model logit fails its request only when the processor fused
      it (its channel carries the fault); vLLM samples rows without experts itself;
    - a request vLLM's own checks refuse (e.g. longer than `vllm.max_model_len`) gets a
      RequestError through `put`, not from `submit`: they run when the decoder thread adds it;
    - a failed start of vLLM is kept: every later request gets the same error, since a start
      that failed part way leaves vLLM's process-wide state (its model-parallel groups) set,
      which a second start in the same process would meet half made;
    - one thread, never idle-ended: vLLM's CPU attention checks the OpenMP thread count of the
      thread that built its metadata, so every step runs on the thread that started vLLM;
    - vLLM's scheduler batches and splits (`max_num_seqs`): `batching.window_ms` and
      `batching.max_rows` apply to the batcher only;
    - log-probabilities (`logprobs=k`) are vLLM's `processed_logprobs` (`launch.engine_arguments`):
      the batcher's fused ones (`runtime.sampler`) for greedy rows and rows sampled at
      temperature 1 without top-k / top-p; other sampled rows would report them after their
      temperature (and top-k / top-p), so asking for them there is a RequestError;
    - a grammar (`structured_outputs`) is compiled and applied by vLLM's structured-output
      manager (the same xgrammar, checked here first by the engine): vLLM masks the large row
      before custom logits processors, and the fused row keeps the mask (`core.fusion`).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ...core.config import FusionConfig, GenerationSpec, StructuredOutputs
from ...core.errors import DeviceError, FusionError, RequestError, described
from ...runtime.decoder import SHUTDOWN, row_fault, stop_at_exit, typed_fault
from ...runtime.grammar import compact_json_grammar
from ...runtime.models import resolve_device
from ...runtime.request import Request, RowEvent, Submission, Ticket, TokenScores
from ...runtime.sampler import GREEDY_TEMPERATURE
from .channel import CHANNEL_KEY, CHANNELS, CHANNELS_LOCK, UNFUSED, RowChannel
from .launch import check_hostable, engine_arguments, vllm_environment


@dataclass
class _Row:
    ticket: Ticket
    index: int  # within its request
    channel: RowChannel
    sent: int = 0  # tokens delivered


class VllmDecoder:
    """Owns vLLM's engine for one FusionEngine; see the module docstring."""

    def __init__(self, config: FusionConfig, models_lock: threading.RLock):
        self._config = config
        self._models_lock = models_lock  # the processor runs the small models inside a step
        self._incoming: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._engine = None
        self._start_error: FusionError | None = None
        self._rows: dict[str, _Row] = {}  # vLLM request id -> row
        self._rows_left: dict[int, int] = {}  # ticket id -> its rows still in vLLM
        self._ids = itertools.count()
        stop_at_exit(self)

    def submit(self, request: Request, put: Callable[[object], None]) -> Submission:
        """Queue a request; its events go to `put` (`runtime.decoder`: events and faults)."""
        submission = Submission(put, 1)
        self._queue(Ticket(request, 0, submission))
        return submission

    def start(self) -> None:
        """Start vLLM now (otherwise the first request does); raises what keeps it from starting.
        It starts on the decoder thread, like every later step: vLLM's CPU attention checks that
        its metadata was built with the OpenMP thread count of the thread that runs it."""
        started = threading.Event()
        self._queue(started)
        started.wait()
        if self._engine is None:
            raise self._start_error

    def _queue(self, item) -> None:
        with self._lock:
            self._incoming.put(item)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._serve, name="fusion-llm-vllm", daemon=True
                )
                self._worker.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the decoder thread once it is idle (vLLM's engine stays for the next request)."""
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._incoming.put(SHUTDOWN)
            worker.join(timeout_s)

    # -- the loop ------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            arrived = self._wait(block=not self._rows)
            if arrived is None:
                return
            engine = self._started()
            try:
                for ticket in arrived:
                    if isinstance(ticket, threading.Event):  # start(): vLLM is up (or refused)
                        ticket.set()
                    elif engine is None:
                        ticket.submission.fail(self._start_error)
                    else:
                        self._add(engine, ticket)
                if engine is None or not self._rows:
                    continue
                self._abort_cancelled(engine)
                with self._models_lock:
                    outputs = engine.step()
                self._deliver(engine, outputs)
            except BaseException as fault:  # noqa: BLE001 - a shared step: fail what it holds
                self._fail_all(engine, fault)

    def _wait(self, block: bool) -> list | None:
        """What arrived (waiting for something when idle); None at shutdown."""
        arrived = []
        while True:
            try:
                item = self._incoming.get(block=block and not arrived)
            except queue.Empty:
                return arrived
            if item is SHUTDOWN:
                return None
            arrived.append(item)

    def _started(self):
        """vLLM's engine, started on first use (None if it cannot start: every request fails)."""
        if self._engine is None and self._start_error is None:
            try:
                self._engine = _start_engine(self._config)
            except FusionError as err:
                self._start_error = err
            except BaseException as err:  # noqa: BLE001 - vLLM refuses with many exception types
                self._start_error = DeviceError(
                    f"vLLM could not start the large model ({described(err)})"
                )
        return self._engine

    def _add(self, engine, ticket: Ticket) -> None:
        from vllm import TokensPrompt

        request = ticket.request
        added = []
        try:
            for index in range(request.rows):
                request_id = f"fusion-{next(self._ids)}"
                row = request.row_prompt(index, 0)
                channel = RowChannel(row.small, row.expert_prompts)
                with CHANNELS_LOCK:
                    CHANNELS[request_id] = channel
                self._rows[request_id] = _Row(ticket, index, channel)
                self._rows_left[ticket.id] = index + 1
                added.append(request_id)
                params = _sampling_params(
                    request.spec,
                    ticket.seeds[index],
                    request.eos_ids,
                    row.experts,
                    request.mode,
                    request_id,
                )
                engine.add_request(request_id, TokensPrompt(prompt_token_ids=row.large), params)
        except BaseException as err:  # noqa: BLE001 - vLLM's validation, or a fault of its own
            self._forget(engine, added, abort=True)
            if isinstance(err, (ValueError, TypeError)):
                ticket.submission.fail(RequestError(f"vLLM rejected the request: {err}"))
            else:
                ticket.submission.fail(typed_fault(err))

    def _abort_cancelled(self, engine) -> None:
        cancelled = [rid for rid, row in self._rows.items() if row.ticket.submission.finished]
        if cancelled:
            self._forget(engine, cancelled, abort=True)

    def _forget(self, engine, request_ids: list[str], abort: bool) -> None:
        if abort and request_ids:
            engine.abort_request(request_ids)
        with CHANNELS_LOCK:
            for rid in request_ids:
                CHANNELS.pop(rid, None)
                row = self._rows.pop(rid, None)
                if row is not None:
                    self._rows_left[row.ticket.id] -= 1
                    if not self._rows_left[row.ticket.id]:
                        del self._rows_left[row.ticket.id]

    def _fail_all(self, engine, fault: BaseException) -> None:
        error = typed_fault(fault)
        held = list(self._rows)
        for rid in held:
            self._rows[rid].ticket.submission.fail(error)
        self._forget(engine, held, abort=True)

    def _deliver(self, engine, outputs) -> None:
        """Send each request its rows' new tokens; a row the processor found without a finite
        large-model logit fails its own request, whose other rows leave vLLM now."""
        events: dict[int, tuple[Ticket, list[RowEvent]]] = {}
        ended = []
        for output in outputs:
            row = self._rows.get(output.request_id)
            if row is None:
                continue  # aborted while in flight, or its request failed earlier in this step
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            with CHANNELS_LOCK:
                steps = [row.channel.steps.pop(row.sent + i, UNFUSED) for i in range(len(tokens))]
            if any(step.fault for step in steps):
                row.ticket.submission.fail(row_fault())
                self._forget(engine, self._rows_of(row.ticket), abort=True)
                continue
            request = row.ticket.request
            batch = events.setdefault(row.ticket.id, (row.ticket, []))[1]
            scores = _token_scores(completion.logprobs, len(tokens))
            for i, (token, step) in enumerate(zip(tokens, steps, strict=True)):
                last = output.finished and i == len(tokens) - 1
                reason = _finish_reason(completion, token, request.eos_ids) if last else None
                event = RowEvent(row.index, token, step.alpha, step.fallback, reason, scores[i])
                batch.append(event)
            row.sent += len(tokens)
            if output.finished:
                ended.append(output.request_id)
        for ticket, batch in events.values():
            ticket.submission.deliver(batch)
        for rid in ended:
            row = self._rows.get(rid)
            if row is None:
                continue  # its request failed later in this step
            self._forget(None, [rid], abort=False)
            if row.ticket.id not in self._rows_left:
                row.ticket.submission.part_done()

    def _rows_of(self, ticket: Ticket) -> list[str]:
        return [rid for rid, row in self._rows.items() if row.ticket is ticket]


def _start_engine(config: FusionConfig):
    os.environ.update(vllm_environment(config))
    # In-process engine core and executor: the processor's row channels live in this process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import EngineArgs, LLMEngine

    check_hostable(config)
    arguments = engine_arguments(config, resolve_device(config.large))
    if config.vllm.tensor_parallel_size * config.vllm.pipeline_parallel_size == 1:
        arguments.setdefault("distributed_executor_backend", "uni")
    arguments.setdefault("disable_log_stats", True)
    return LLMEngine.from_engine_args(EngineArgs(**arguments))


def _sampling_params(
    spec: GenerationSpec,
    seed: int | None,
    eos_ids: set[int],
    experts: list[str],
    mode: str,
    channel: str,
):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    greedy = spec.temperature < GREEDY_TEMPERATURE
    reshaped = spec.temperature != 1.0 or spec.top_k is not None or spec.top_p < 1.0
    if spec.logprobs is not None and not greedy and reshaped:
        msg = (
            "logprobs on the vllm backend are the fused ones only for greedy rows and rows "
            "sampled at temperature 1 without top_k / top_p (vLLM reports them after those); "
            "use temperature 0 or 1 without top_k / top_p, or backend: hf"
        )
        raise RequestError(msg)
    return SamplingParams(
        max_tokens=spec.max_new_tokens,
        temperature=0.0 if greedy else spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k or 0,
        seed=None if greedy else seed,
        stop=list(spec.stop),
        stop_token_ids=sorted(eos_ids),
        ignore_eos=spec.ignore_eos,
        logprobs=spec.logprobs,
        flat_logprobs=True,  # per token: the chosen entry, then the top-k in order (`_token_scores`)
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=_structured_outputs(spec.structured_outputs),
        extra_args={"experts": list(experts), "fusion_mode": mode, CHANNEL_KEY: channel},
    )


def _structured_outputs(structured: StructuredOutputs | None):
    """vLLM's form of the request's grammar: the same fields by the same names (vLLM masks the
    large row with it before the fusion processor, which keeps the mask: `fusion_step`). vLLM's
    xgrammar backend reads `disable_any_whitespace` from its server-wide settings only, so
    compact JSON goes to it as the equivalent EBNF."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if structured.kind in ("json", "json_object") and structured.disable_any_whitespace:
        return StructuredOutputsParams(grammar=compact_json_grammar(structured))
    fields = structured.model_dump(by_alias=True, exclude_none=True)
    if isinstance(fields.get("structural_tag"), dict):  # vLLM takes the tag as JSON text
        fields["structural_tag"] = json.dumps(fields["structural_tag"])
    return StructuredOutputsParams(**fields)


def _token_scores(logprobs, tokens: int) -> list[TokenScores | None]:
    """The new tokens' `TokenScores` from vLLM's `FlatLogprobs` (None: the row did not ask).
    Each position holds the chosen token's entry first, then the k most likely in rank order
    (`vllm.logprobs.append_logprobs_for_next_position`; the chosen token may repeat among them)."""
    if logprobs is None:
        return [None] * tokens
    values = logprobs.logprobs
    return [
        TokenScores(
            values[start],
            list(zip(logprobs.token_ids[start + 1 : end], values[start + 1 : end], strict=True)),
        )
        for start, end in zip(logprobs.start_indices, logprobs.end_indices, strict=True)
    ]


def _finish_reason(completion, token: int, eos_ids: set[int]) -> str:
    if token in eos_ids:
        return "eos"
    if completion.finish_reason == "length":
        return "length"
    return "stop"
