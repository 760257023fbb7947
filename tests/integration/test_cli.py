"""The `fusion-llm` command: generate from a config file; user errors exit 2 with one line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusion_llm.cli.main import main
from fusion_llm.eval.baselines import load_committed
from fusion_llm.eval.tasks import TASKS, load_task
from fusion_llm.experts.data import read_jsonl
from fusion_llm.tiny import family_config
from fusion_llm.zoo import MODELS_DIR, read_manifest


@pytest.fixture(scope="module")
def config_file(tiny_family, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "fusion.yaml"
    path.write_text(yaml.safe_dump(family_config(tiny_family, experts=("lora_a", "full"))))
    return path


def test_generate_prints_json_with_the_alpha_trace(config_file, capsys):
    code = main(["generate", "--config", str(config_file), "the king", "a river",
                 "--max-new-tokens", "3", "--experts", "lora_a", "--json", "--trace"])  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(lines) == 2
    assert all(r["completion_tokens"] == 3 and len(r["alpha"]) == 3 for r in lines)
    assert lines[0]["experts"] == ["lora_a"] and lines[0]["mode"] == "static"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--experts", "nobody"], "unknown expert"),
        (["--max-new-tokens", "-1"], "max_new_tokens"),
        (["--temperature", "-2"], "temperature"),
    ],
)
def test_bad_requests_exit_2_with_one_line(config_file, capsys, args, match):
    code = main(["generate", "--config", str(config_file), "the king", *args])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1


@pytest.mark.subprocess
def test_a_bad_config_file_exits_2_from_the_installed_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("large: {path: /nowhere}\nsmall: {path: /nowhere}\nfusion: {alpha_min: 3}\n")
    run = subprocess.run(
        [sys.executable, "-m", "fusion_llm.cli", "generate", "--config", str(bad), "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.startswith("error: invalid config: fusion: Value error, alpha_min")
    assert run.stderr.count("\n") == 1


@pytest.mark.subprocess
def test_a_reader_that_closes_the_pipe_stops_the_command_quietly():
    """`fusion-llm zoo export trivia | head -1`: no BrokenPipeError traceback."""
    command = [sys.executable, "-m", "fusion_llm.cli", "zoo", "export", "trivia"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes its 800 rows
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


@pytest.mark.slow
def test_reproduce_quick_mode_recomputes_fusion_rows_and_reads_committed_baselines(
    tmp_path, capsys
):
    assert main(["reproduce", "--n", "1", "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    progress = capsys.readouterr()
    assert "table 3 timing: round 1 of 3" in progress.err  # the long stages say where they are
    table = json.loads((tmp_path / "table1.json").read_text())
    assert list(table) == [
        "large base", "large full FT", "large LoRA",
        "small expert", "static from small", "paper from small", "dynamic from small",
        "mid expert", "static from mid", "paper from mid", "dynamic from mid",
    ]  # fmt: skip
    committed = load_committed()
    for name, row in table.items():
        assert set(row["scores"]) == {"math", "truthful", "trivia", "summary", "mc", "avg"}
        assert all(0.0 <= v <= 100.0 for v in row["scores"].values())
        assert row["committed"] == (name in ("large full FT", "large LoRA"))
        if row["committed"]:
            assert row["scores"] == committed["rows"][name] and row["seconds"] is None
        else:
            assert row["samples"] == 5 and row["seconds"] > 0
    table2 = json.loads((tmp_path / "table2.json").read_text())
    assert list(table2) == [
        "large base", "large multi-task FT", "small multi-task FT", "paper, 4 small experts",
        "dynamic, 4 small experts", "mid multi-task FT", "paper, 4 mid experts",
        "dynamic, 4 mid experts",
    ]  # fmt: skip
    out = progress.out
    assert all(f"## {name}" in out for name in ("table1", "table2", "icl", "table3"))
    assert "measured by `fusion-llm reproduce --full --n 50 --max-new-tokens 48`" in out
    # Committed at n=50: at n=1 gap closed would mix sample sizes, so it is left out.
    assert "gap closed is left out" in out
    rows = (tmp_path / "table1.md").read_text().splitlines()[2:]
    assert all(line.endswith("| - |") for line in rows if line.startswith("| "))
    cost = json.loads((tmp_path / "table3.json").read_text())
    built = read_manifest(MODELS_DIR)["models"]  # quick mode prices training as the build timed it
    assert cost["large full FT"]["train_total_s"] == pytest.approx(
        sum(built[f"large-{t}"]["train_seconds"] for t in TASKS)
    )
    assert (tmp_path / "alpha_math.png").stat().st_size > 0


def generated(capsys, *args: str) -> list[dict]:
    """The JSON records `fusion-llm generate --json` printed."""
    assert main(["generate", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_prompt_read_from_stdin_generates_what_the_same_argument_does(
    config_file, capsys, monkeypatch
):
    settings = ["--config", str(config_file), "--max-new-tokens", "3"]
    expected = generated(capsys, *settings, "the king\na river")
    monkeypatch.setattr("sys.stdin", io.StringIO("the king\na river\n"))  # final newline dropped
    assert generated(capsys, *settings, "-") == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("the king\na river\n"))
    assert generated(capsys, *settings) == expected  # no PROMPT, stdin piped


def test_a_prompts_file_gives_one_prompt_per_json_line(config_file, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"the king"\n\n"a river\\nthe king"\n')
    settings = ["--config", str(config_file), "--max-new-tokens", "3"]
    from_file = generated(capsys, *settings, "--prompts-file", str(prompts))
    assert from_file == generated(capsys, *settings, "the king", "a river\nthe king")


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "cannot read --prompts-file"), ('"ok"\nthe king\n', "prompts.jsonl:2: each line")],
)
def test_a_bad_prompts_file_exits_2_naming_the_line(config_file, capsys, tmp_path, content, match):
    prompts = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts.write_text(content)
    code = main(["generate", "--config", str(config_file), "--prompts-file", str(prompts)])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1


def test_trace_prints_each_tokens_text_next_to_its_alpha(config_file, capsys):
    (record,) = generated(capsys, "--config", str(config_file), "the king", "--max-new-tokens",
                          "4", "--experts", "lora_a,full", "--trace")  # fmt: skip
    assert len(record["tokens"]) == len(record["alpha"]) == record["completion_tokens"]
    assert "".join(record["tokens"]).startswith(record["text"])
    main(["generate", "--config", str(config_file), "the king", "--max-new-tokens", "4",
          "--experts", "lora_a,full", "--trace"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("# step"))
    assert lines[header].split()[-2:] == ["lora_a", "full"]
    steps = lines[header + 1 :]
    assert len(steps) == 4
    for step, (line, token, alpha) in enumerate(
        zip(steps, record["tokens"], record["alpha"], strict=True)
    ):
        assert line.startswith(f"# {step:>4}  {token!r}")
        assert [float(a) for a in line.split()[-2:]] == pytest.approx(alpha, abs=1e-3)


def test_threads_sets_torchs_thread_count(config_file, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        main(["generate", "--config", str(config_file), "the king", "--max-new-tokens", "1",
              "--threads", "1"])  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["generate", "--config", str(config_file), "x", "--threads", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["zoo", "build", "--scale", "toy", "--threads", "-1"], "--threads"),
        (["bench", "--prompt-tokens", "0"], "--prompt-tokens"),
        (["reproduce", "--threads", "0"], "--threads"),
        (["demo", "--threads", "0"], "--threads"),
    ],
)
def test_a_count_below_its_minimum_is_one_line_and_exit_2(command, flag, capsys, tmp_path):
    assert main([*command, "--out", str(tmp_path / "never")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: argument {flag}: must be at least 1")
    assert not (tmp_path / "never").exists()


def test_relative_model_paths_are_read_from_the_config_files_folder(
    tiny_family, capsys, tmp_path, monkeypatch
):
    folder = tiny_family["large"].parent
    config = {
        "large": {"path": "large"},
        "small": {"path": "./small"},
        "experts": [{"name": "a", "path": tiny_family["lora_a"].name}],
    }
    path = folder / "relative.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # nothing named large/ or small/ here
    (record,) = generated(capsys, "--config", str(path), "the king", "--max-new-tokens", "2")
    assert record["experts"] == ["a"] and record["completion_tokens"] == 2


def test_zoo_config_prints_a_config_that_generate_runs_as_written(capsys, tmp_path):
    assert main(["zoo", "config", "--source", "small", "--kind", "full"]) == 0
    path = tmp_path / "fusion.yaml"
    path.write_text(capsys.readouterr().out)
    data = yaml.safe_load(path.read_text())
    assert [e["name"] for e in data["experts"]] == list(TASKS)
    assert all(Path(e["path"]).is_dir() for e in data["experts"])
    prompt = load_task("trivia", "eval", 1)[0].prompt
    (record,) = generated(capsys, "--config", str(path), prompt, "--experts", "trivia")
    assert record["experts"] == ["trivia"] and "\n" not in record["text"]
    assert main(["zoo", "config", "--experts", "math,poetry"]) == 2
    assert "unknown task(s) poetry" in capsys.readouterr().err


def test_zoo_info_prints_every_shipped_models_folder(capsys):
    assert main(["zoo", "info"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    shipped = [n for n, m in read_manifest(MODELS_DIR)["models"].items() if m["shipped"]]
    folders = {line.split()[0]: line.split()[-1] for line in rows}
    assert all(Path(folders[name]) == MODELS_DIR / name for name in shipped)
    assert all(Path(folders[name]).is_dir() for name in shipped)


def test_zoo_export_writes_a_tasks_split_as_rows_train_expert_reads(capsys, tmp_path):
    assert main(["zoo", "export", "math", "--split", "eval", "--n", "3"]) == 0
    out = tmp_path / "math.jsonl"
    out.write_text(capsys.readouterr().out)
    expected = load_task("math", "eval", 3)
    assert [(r.prompt, r.completion) for r in read_jsonl(out)] == [
        (e.prompt, e.target) for e in expected
    ]
    assert main(["zoo", "export", "math", "--n", "0"]) == 2
    assert "--n: must be at least 1, got 0" in capsys.readouterr().err
