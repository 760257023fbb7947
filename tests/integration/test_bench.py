"""`fusion-llm bench` at a toy size, so it cannot rot (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from fusion_llm.cli.main import main


@pytest.mark.slow
def test_bench_runs_every_section_and_writes_json_and_markdown(tmp_path, capsys):
    code = main([
        "bench", "--shapes", "toy", "--batch-sizes", "1,2", "--experts", "1,2",
        "--prompt-tokens", "6", "--new-tokens", "2", "--repeats", "1",
        "--solver-vocabs", "300", "--out", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    toy = results["shapes"]["toy"]
    assert len(toy["step ms"]) == 2 * (1 + 2 * 2 * 3)  # batches x (none + k x kinds x modes)
    assert set(toy["parts ms"]["lora|k2|b2"]) >= {"large forward", "small forward", "solve dynamic"}
    assert set(toy["baselines ms"]["lora|k2|b2"]) == {
        "hf generate (large alone)", "proxy-tuning loop", "engine none", "engine static", "engine dynamic",
    }  # fmt: skip
    assert toy["memory"]["weights MB"] > 0 and toy["memory"]["kv MB"] > 0
    assert [r["batch"] for r in toy["grammar"]] == [1]  # of 1 and 8, the batches measured
    assert toy["grammar"][0]["json ms"] > 0 and toy["grammar"][0]["json / free"] > 0
    assert any(k.startswith("5. proxy loop") for k in toy["targets"])
    assert toy["concurrency"]["identical outputs"] is True and toy["concurrency"]["calls"] == 32
    assert toy["scheduling"]["sampled outputs equal their alone-outputs"] is True
    assert {k.split(".")[0] for k in toy["targets"]} >= {"7", "8", "9", "10"}
    assert {r["vocab"] for r in results["solver"]} == {300}
    assert (
        "## Shape `toy`" in (tmp_path / "bench.md").read_text()
        and "Targets" in capsys.readouterr().out
    )


def test_bench_rejects_an_unknown_shape_with_exit_2(capsys):
    assert main(["bench", "--shapes", "huge"]) == 2
    assert "bench needs shapes from toy, realistic" in capsys.readouterr().err
