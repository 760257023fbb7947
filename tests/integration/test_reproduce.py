"""`fusion-llm reproduce --full` on a zoo built at toy scale: the large baselines are retrained and
every table, the cost table and the alpha figure are written from one run."""

import json

import pytest
from safetensors.torch import load_file

from fusion_llm.cli.main import main
from fusion_llm.eval.reproduce import Reproduction, icl_table, table2
from fusion_llm.eval.tasks import TASKS


@pytest.fixture(scope="module")
def full_run(toy_zoo, tmp_path_factory):
    root, manifest = toy_zoo
    out = tmp_path_factory.mktemp("reproduce")
    args = ["reproduce", "--full", "--n", "2", "--max-new-tokens", "3", "--out", str(out / "results"),
            "--models-dir", str(root / "models"), "--baselines", str(out / "baselines")]  # fmt: skip
    assert main(args) == 0
    return root, manifest, out


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_full_retrains_every_large_baseline_from_the_large_base(full_run):
    root, _, out = full_run
    trained = _json(out / "baselines" / "zoo.json")["models"]
    assert set(trained) == {"large-multi"} | {f"large-{t}{s}" for t in TASKS for s in ("", "-lora")}
    base = load_file(root / "models" / "large" / "model.safetensors")
    tuned = load_file(out / "baselines" / "large-trivia" / "model.safetensors")
    assert any(not base[k].equal(tuned[k]) for k in base)  # fine-tuning changed the weights
    merged = load_file(out / "baselines" / "merged" / "large-trivia-lora" / "model.safetensors")
    assert set(merged) == set(base)  # the LoRA baseline was merged into a plain checkpoint


@pytest.mark.slow
def test_full_writes_baseline_results_in_the_committed_format(full_run):
    _, _, out = full_run
    committed = _json(out / "results" / "baselines.json")
    assert (committed["n"], committed["max_new_tokens"]) == (2, 3)
    assert list(committed["rows"]) == ["large full FT", "large LoRA", "large multi-task FT"]
    table1 = _json(out / "results" / "table1.json")
    assert committed["rows"]["large LoRA"] == table1["large LoRA"]["scores"]
    assert table1["large LoRA"]["committed"] is False and table1["large LoRA"]["seconds"] > 0


@pytest.mark.slow
def test_every_table_is_written_and_rows_are_reproducible(full_run):
    root, _, out = full_run
    results = out / "results"
    tables = {name: _json(results / f"{name}.json") for name in ("table1", "table2", "icl")}
    assert list(tables["icl"]) == [
        "large base", "large 5-shot", "dynamic from small", "dynamic from small + 5-shot",
        "dynamic from mid", "dynamic from mid + 5-shot",
    ]  # fmt: skip
    # A fresh evaluation (new engines, same prompts, greedy) gives the same scores.
    fresh = Reproduction(2, 3, root / "models", log=lambda line: None)
    for table, name in (("table2", "large base"), ("icl", "dynamic from mid + 5-shot")):
        row = next(
            r for r in (table2() if table == "table2" else icl_table()).rows if r.name == name
        )
        assert fresh.row(row).scores == tables[table][name]["scores"]
    for table in tables.values():
        for row in table.values():
            assert set(row["scores"]) == {*TASKS, "avg"} and row["samples"] == 2 * len(TASKS)
    assert "gap closed" in (results / "table1.md").read_text()


@pytest.mark.slow
def test_cost_table_uses_the_measured_train_times(full_run):
    _, manifest, out = full_run
    cost = _json(out / "results" / "table3.json")
    trained = _json(out / "baselines" / "zoo.json")["models"]
    seconds = manifest["models"]
    assert cost["static from mid"]["train_s"] == {
        t: seconds[f"mid-{t}"]["train_seconds"] for t in TASKS
    }
    assert cost["large LoRA"]["train_total_s"] == pytest.approx(
        sum(trained[f"large-{t}-lora"]["train_seconds"] for t in TASKS)
    )
    assert all(c["infer_s_per_1000"] > 0 for c in cost.values())
    assert cost["large LoRA"]["infer_s_per_1000"] == cost["large base"]["infer_s_per_1000"]


@pytest.mark.slow
def test_alpha_figure_has_a_paper_and_a_dynamic_trace(full_run):
    _, _, out = full_run
    assert (out / "results" / "alpha_math.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    traces = _json(out / "results" / "alpha_math.json")["traces"]
    assert set(traces) == {"paper", "dynamic"}
    for trace in traces.values():
        assert 1 <= len(trace["alpha"]) <= 3 and all(0.0 <= a <= 2.0 for a in trace["alpha"])
        assert len(trace["tokens"]) == len(trace["alpha"])  # one generated token per step
    paper = traces["paper"]["alpha"]
    assert all(abs(10 * a - round(10 * a)) < 1e-4 for a in paper)  # on the paper's 0.1 grid


@pytest.mark.slow
def test_reproduce_refuses_an_n_beyond_the_eval_split(toy_zoo, tmp_path, capsys):
    root, _ = toy_zoo
    code = main(["reproduce", "--full", "--n", "999", "--models-dir", str(root / "models"),
                 "--baselines", str(tmp_path / "b"), "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2 and "n must be in 1..8" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any training


@pytest.mark.slow
def test_quick_mode_refuses_another_zoo(toy_zoo, tmp_path, capsys):
    root, _ = toy_zoo
    code = main(["reproduce", "--n", "1", "--models-dir", str(root / "models"),
                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2 and "use --full with --models-dir" in capsys.readouterr().err


def test_baselines_folder_without_full_is_refused(tmp_path, capsys):
    code = main(["reproduce", "--baselines", str(tmp_path / "b"), "--out", str(tmp_path / "r")])
    assert code == 2 and "add --full" in capsys.readouterr().err
