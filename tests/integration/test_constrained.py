"""Constrained decoding in the HF engine: every token follows the request's grammar.

The tiny family has random weights, so it writes no JSON, number or choice by itself: every
valid output here is the grammar's doing. Grammars with a finite language (choices, bounded
regexes, schemas of booleans / enums / small integers without free whitespace) must complete;
the others must stay valid prefixes and end with finish_reason "length".
"""

from __future__ import annotations

import json
import math
import re
import threading

import pytest
import torch
import xgrammar
from reference_decoder import fused_step_without_cache

from fusion_llm import FusionEngine, RequestError
from fusion_llm.core.fusion import make_solver
from fusion_llm.runtime.grammar import choice_grammar
from fusion_llm.tiny import family_config

pytestmark = pytest.mark.slow

BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "colour", "n"],
    "additionalProperties": False,
}
PROMPTS = ["the king", "zq zq the queen of Rome", "a b c", "hello there"]


@pytest.fixture(scope="module")
def merging_engine(tiny_family) -> FusionEngine:
    """Concurrent calls within 300 ms share one batch."""
    config = family_config(tiny_family)
    config["batching"] = {"window_ms": 300}
    return FusionEngine(config).load()


def test_a_json_schema_with_a_finite_language_completes_as_valid_json(engine):
    structured = {"json": BOUNDED_SCHEMA, "disable_any_whitespace": True}
    for mode in ("none", "static", "dynamic"):
        for g in engine.generate(
            PROMPTS, structured_outputs=structured, max_new_tokens=40, mode=mode
        ):
            value = json.loads(g.text)
            assert set(value) == {"ok", "colour", "n"}
            assert isinstance(value["ok"], bool) and value["colour"] in {"red", "green", "blue"}
            assert 0 <= value["n"] <= 9 and g.finish_reason == "eos"


def test_without_a_grammar_the_same_rows_write_no_json(engine):
    for g in engine.generate(PROMPTS, max_new_tokens=40):
        with pytest.raises(ValueError):
            json.loads(g.text)


def test_sampled_rows_follow_the_grammar_too(engine):
    choices = ["alpha", "beta gamma", "delta"]
    texts = {
        g.text
        for seed in range(4)
        for g in engine.generate(
            PROMPTS,
            structured_outputs={"choice": choices},
            temperature=1.5,
            seed=seed,
            max_new_tokens=20,
        )
    }
    assert texts <= set(choices)
    assert len(texts) > 1  # sampling still chooses among the allowed outputs


@pytest.mark.parametrize(
    ("structured", "pattern"),
    [
        ({"regex": r"[0-9]{3}-(ab|cd)"}, r"[0-9]{3}-(ab|cd)"),
        ({"grammar": 'root ::= ("yes" | "no") " " [a-c]{2}'}, r"(yes|no) [a-c]{2}"),
        ({"choice": ["first answer", "second"]}, r"first answer|second"),
    ],
    ids=["regex", "ebnf", "choice"],
)
def test_regex_ebnf_and_choice_outputs_match_their_language(engine, structured, pattern):
    for g in engine.generate(PROMPTS, structured_outputs=structured, max_new_tokens=30):
        assert re.fullmatch(pattern, g.text), g.text
        assert g.finish_reason == "eos"


def test_a_structural_tag_constrains_the_tagged_part(engine):
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<call>",
            "content": {"type": "regex", "pattern": "[0-9]{3}"},
            "end": "</call>",
        },
    }
    for g in engine.generate(
        PROMPTS, structured_outputs={"structural_tag": tag}, max_new_tokens=60
    ):
        assert g.text.startswith("<call>") and g.text.endswith("</call>"), g.text
        assert re.fullmatch("[0-9]{3}", g.text[len("<call>") : -len("</call>")]), g.text


def test_response_format_is_read_as_structured_outputs(engine):
    schema_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": BOUNDED_SCHEMA}}
    by_format = engine.generate(PROMPTS, response_format=schema_format, max_new_tokens=60)
    by_field = engine.generate(
        PROMPTS, structured_outputs={"json": BOUNDED_SCHEMA}, max_new_tokens=60
    )
    assert [g.token_ids for g in by_format] == [g.token_ids for g in by_field]
    for g in engine.generate(PROMPTS, response_format={"type": "json_object"}, max_new_tokens=8):
        assert g.text.lstrip().startswith("{")
    plain = engine.generate(PROMPTS, max_new_tokens=8)
    as_text = engine.generate(PROMPTS, response_format={"type": "text"}, max_new_tokens=8)
    assert [g.token_ids for g in as_text] == [g.token_ids for g in plain]


def test_a_grammar_cut_by_max_tokens_ends_with_length_and_a_valid_prefix(engine):
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    matcher_grammar = compiler(engine).compile_json_schema(json.dumps(schema))
    for g in engine.generate(PROMPTS, structured_outputs={"json": schema}, max_new_tokens=6):
        assert g.finish_reason == "length" and len(g.token_ids) == 6
        matcher = xgrammar.GrammarMatcher(matcher_grammar)
        assert all(matcher.accept_token(t) for t in g.token_ids)


def test_greedy_constrained_tokens_are_the_argmax_of_fusion_over_the_allowed_tokens(engine):
    """The reference: every model re-reads the sequence, the large row is masked to the
    grammar's allowed tokens, fused by `fusion_step`, and the argmax taken."""
    experts, structured = ["lora_a", "full"], {"regex": r"[a-z ]{3,12}\."}
    generated = engine.generate(
        "the king",
        structured_outputs=structured,
        experts=experts,
        mode="dynamic",
        max_new_tokens=14,
    )[0]
    matcher = xgrammar.GrammarMatcher(compiler(engine).compile_regex(structured["regex"]))
    solver = make_solver("dynamic", torch.ones(2), engine.config.fusion)
    ids = engine.tokenizer("the king")["input_ids"]
    bitmask = xgrammar.allocate_token_bitmask(1, engine.models.vocab_size)
    for step, token in enumerate(generated.token_ids):
        matcher.fill_next_token_bitmask(bitmask)

        def masked(logits):
            logits = logits[:, : engine.models.vocab_size].clone()
            xgrammar.apply_token_bitmask_inplace(logits, bitmask)
            return logits

        reference = fused_step_without_cache(
            engine, ids, ids, experts, solver, generated.token_ids[:step], large_filter=masked
        )
        assert int(reference.logits.argmax()) == token
        assert matcher.accept_token(token)
    assert re.fullmatch(structured["regex"], generated.text)


def compiler(engine) -> xgrammar.GrammarCompiler:
    info = xgrammar.TokenizerInfo.from_huggingface(
        engine.tokenizer, vocab_size=engine.models.vocab_size
    )
    return xgrammar.GrammarCompiler(info)


def allowed_tokens(matcher: xgrammar.GrammarMatcher, vocab_size: int) -> set[int]:
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    logits = torch.zeros(1, vocab_size)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_constrained_logprobs_are_over_the_allowed_tokens_only(engine):
    """The reported distribution is the one sampled from: after the grammar's mask."""
    choices = ["red", "green", "blue"]
    g = engine.generate(
        "the king", structured_outputs={"choice": choices}, logprobs=5, max_new_tokens=20
    )[0]
    matcher = xgrammar.GrammarMatcher(compiler(engine).compile_grammar(choice_grammar(choices)))
    for token, entry in zip(g.token_ids, g.logprobs, strict=True):
        allowed = allowed_tokens(matcher, engine.models.vocab_size)
        finite = {t for t, _, logprob in entry.top if logprob > -math.inf}
        assert finite <= allowed and entry.top[0][0] == token
        if len(allowed) <= 5:  # every allowed token is listed: their mass is all of it
            assert sum(math.exp(lp) for *_, lp in entry.top) == pytest.approx(1.0, abs=1e-5)
        assert matcher.accept_token(token)


def test_streaming_a_constrained_request_gives_the_same_text(engine):
    structured = {"json": BOUNDED_SCHEMA, "disable_any_whitespace": True}
    whole = engine.generate("a b c", structured_outputs=structured, max_new_tokens=40)[0]
    pieces = list(engine.stream("a b c", structured_outputs=structured, max_new_tokens=40))
    assert "".join(p.text for p in pieces) == whole.text
    assert pieces[-1].generation.finish_reason == whole.finish_reason


def run_together(engine: FusionEngine, calls: dict[str, dict]) -> dict[str, object]:
    """Run each named call of `calls` (generate keywords) from its own thread, at once."""
    outcome: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            outcome[name] = engine.generate(**calls[name])[0]
        except BaseException as err:  # noqa: BLE001 - the test inspects what each caller got
            outcome[name] = err

    threads = [threading.Thread(target=call, args=(n,)) for n in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    return outcome


def test_constrained_and_free_rows_share_a_batch_and_keep_their_alone_outputs(merging_engine):
    calls = {
        "json": {"prompts": "the king", "structured_outputs": {"json": BOUNDED_SCHEMA}},
        "choice": {"prompts": "a b c", "structured_outputs": {"choice": ["yes", "no"]}},
        "free": {"prompts": "hello there"},
    }
    for call in calls.values():
        call["max_new_tokens"] = 40
    alone = {name: merging_engine.generate(**call)[0].token_ids for name, call in calls.items()}
    sizes = []
    handle = merging_engine.models.large.model.register_forward_hook(
        lambda module, args, kwargs, output: sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    try:
        together = run_together(merging_engine, calls)
    finally:
        handle.remove()
    assert max(sizes) == 3, f"the requests were not merged ({sizes})"
    assert {name: g.token_ids for name, g in together.items()} == alone


def test_a_rerun_after_a_shared_fault_rebuilds_each_rows_matcher(merging_engine):
    """A decode step of the merged batch raises once: both requests run again alone, their
    matchers rebuilt, so each output equals its alone output (a matcher advanced twice by
    the replayed tokens would reject them and fail the request)."""
    calls = {
        "json": {"prompts": "the king", "structured_outputs": {"json": BOUNDED_SCHEMA}},
        "regex": {"prompts": "a b c", "structured_outputs": {"regex": r"[0-9]{4}-[a-z]{6}"}},
    }
    for call in calls.values():
        call["max_new_tokens"] = 30
    alone = {name: merging_engine.generate(**call)[0].token_ids for name, call in calls.items()}
    raised = []

    def fail_once(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape == (2, 1) and not raised and kwargs.get("past_key_values") is not None:
            raised.append(True)
            raise RuntimeError("kernel failed")

    handle = merging_engine.models.large.model.register_forward_pre_hook(
        fail_once, with_kwargs=True
    )
    try:
        together = run_together(merging_engine, calls)
    finally:
        handle.remove()
    assert raised, "the requests were not merged"
    assert {name: g.token_ids for name, g in together.items()} == alone


@pytest.mark.parametrize(
    ("structured", "field"),
    [
        ({"json": {"type": "nonsense"}}, "structured_outputs.json"),
        ({"json": "{not json"}, "structured_outputs.json"),
        ({"regex": "(?<=a)b"}, "structured_outputs.regex"),
        ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
        ({"grammar": "root ::= [^\\x00-\\U0010FFFF]"}, "structured_outputs.grammar"),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "bogus"}}}, "structural_tag"),
        ({"choice": []}, "choice"),
        ({"json": {}, "regex": "a"}, "exactly one"),
        ({}, "exactly one"),
    ],
    ids=[
        "bad-schema", "schema-not-json", "lookbehind", "undefined-rule", "no-first-token",
        "bad-tag", "empty-choice", "two-kinds", "no-kind",
    ],
)  # fmt: skip
def test_bad_grammars_are_request_errors_naming_the_field(engine, structured, field):
    with pytest.raises(RequestError, match=re.escape(field)):
        engine.generate("the king", structured_outputs=structured)
    assert engine.generate("the king", max_new_tokens=3)[0].completion_tokens == 3


@pytest.mark.parametrize(
    "response_format",
    [{"type": "xml"}, {"type": "json_schema"}, "json", {"type": "json_schema", "json_schema": {}}],
)
def test_bad_response_formats_are_request_errors_naming_the_field(engine, response_format):
    with pytest.raises(RequestError, match="response_format"):
        engine.generate("the king", response_format=response_format)


def test_response_format_and_structured_outputs_together_are_refused(engine):
    with pytest.raises(RequestError, match="not both"):
        engine.generate(
            "the king",
            response_format={"type": "json_object"},
            structured_outputs={"regex": "a+"},
        )
