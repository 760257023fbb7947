"""Request validation (`runtime.validation`) without a model: each bad input gets its typed error,
naming the field to change; good inputs come back resolved; one rule fits ids to a window."""

from __future__ import annotations

import pytest

from fusion_llm.core.errors import ContextWindowError, RequestError, UnknownExpertError
from fusion_llm.runtime.validation import expert_list, fit_to_window, fusion_mode, row_experts

CONFIGURED = ["math", "qa"]


def _window(ids, window, reserve, truncate):
    return fit_to_window(
        ids, window, reserve, truncate, reader="small base", reserved="max_new_tokens"
    )


@pytest.mark.parametrize(
    ("call", "error", "named"),
    [
        (lambda: expert_list(["lawyer"], CONFIGURED), UnknownExpertError, "configured experts"),
        (lambda: expert_list("lawyer", CONFIGURED), UnknownExpertError, "'lawyer'"),
        (lambda: expert_list(["math"], []), UnknownExpertError, "none configured"),
        (lambda: expert_list([3], CONFIGURED), RequestError, "experts must be"),
        (lambda: expert_list(3, CONFIGURED), RequestError, "experts must be"),
        (lambda: fusion_mode("magic", "static"), RequestError, "fusion mode 'magic'"),
        (lambda: fusion_mode(None, "magic"), RequestError, "use one of none, static"),
        (lambda: row_experts([["math"], ["qa"]], 1, CONFIGURED), RequestError, "2 lists for 1"),
        (lambda: row_experts([["math"], ["nobody"]], 2, CONFIGURED), UnknownExpertError, "nobody"),
        (lambda: row_experts([["math"], [3]], 2, CONFIGURED), RequestError, "experts must be"),
        (lambda: _window([1] * 10, 12, 4, False), ContextWindowError, "truncate_prompt=True"),
        (lambda: _window([1] * 10, 12, 4, False), ContextWindowError, "max_new_tokens \\(4\\)"),
        (lambda: _window([1] * 10, 12, 12, True), ContextWindowError, "below 12"),
        (lambda: _window([1], 12, 20, True), ContextWindowError, "small base's context window"),
    ],
)
def test_bad_inputs_raise_typed_errors_naming_the_field(call, error, named):
    with pytest.raises(error, match=named):
        call()


def test_expert_lists_resolve_to_configured_names_each_once():
    assert expert_list(None, CONFIGURED) == CONFIGURED
    assert expert_list("qa", CONFIGURED) == ["qa"]
    assert expert_list(["qa", "math", "qa"], CONFIGURED) == ["qa", "math"]
    assert expert_list([], CONFIGURED) == []


def test_per_row_experts_take_one_list_for_all_rows_or_one_per_row():
    assert row_experts(None, 2, CONFIGURED) == [CONFIGURED, CONFIGURED]
    assert row_experts(["math"], 3, CONFIGURED) == [["math"]] * 3
    assert row_experts([], 2, CONFIGURED) == [[], []]
    assert row_experts([["math"], None, []], 3, CONFIGURED) == [["math"], CONFIGURED, []]


def test_fusion_mode_defaults_to_the_config():
    assert fusion_mode(None, "dynamic") == "dynamic"
    assert fusion_mode("paper", "dynamic") == "paper"


@pytest.mark.parametrize(
    ("length", "window", "reserve", "truncate", "kept"),
    [
        (10, None, 99, False, 10),  # no window stated: unchanged
        (10, 14, 4, False, 10),  # fits exactly
        (10, 12, 4, True, 8),  # the last window - reserve ids
        (10, 8, 0, True, 8),  # the router: nothing reserved
        (10, 12, 11, True, 1),  # one position left for the prompt
    ],
)
def test_fit_to_window_keeps_the_end_of_the_prompt(length, window, reserve, truncate, kept):
    ids = list(range(length))
    assert _window(ids, window, reserve, truncate) == ids[length - kept :]
