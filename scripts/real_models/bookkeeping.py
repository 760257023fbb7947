"""What every step shares: one run per cache (a lock), the files a single-task run left set
aside, wall times and load averages, done stamps, running a fusion-llm command, JSON files."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOAD_INTERVAL = 60.0  # seconds between load-average samples during a step


# What the single-task version of this script left in a cache (data/train.jsonl is its mark).
SINGLE_TASK_FILES = (
    "data/train.jsonl", "data/eval.jsonl", "eval/eval.json", "eval/eval.md", "eval/alpha.png",
    "experts/pyout", "logs/timings.json", "logs/gate.done", "logs/train.log", "logs/gate.log",
    "logs/eval.log", "report.md",
)  # fmt: skip


@contextlib.contextmanager
def exclusive(cache: Path) -> Iterator[None]:
    """One run per cache: two real-model jobs on two cores would slow both past their timings."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{cache}: another run holds {cache / '.lock'}") from None
        yield


def set_aside_single_task_run(cache: Path) -> None:
    """Move a single-task run's files to CACHE/single-task: its timings have another shape, and
    its expert was trained on other rows (with a gate holdout drawn from them)."""
    if not (cache / "data/train.jsonl").is_file():
        return
    aside = cache / "single-task"
    for name in SINGLE_TASK_FILES:
        if (cache / name).exists():
            (aside / name).parent.mkdir(parents=True, exist_ok=True)
            (cache / name).rename(aside / name)
    print(f"{cache}: the single-task run's files are now under {aside}", flush=True)


@contextlib.contextmanager
def timed(cache: Path, key: str, command: str) -> Iterator[None]:
    """Record the wall time of a block that completes, and the 1-minute load average at its start,
    every LOAD_INTERVAL seconds and at its end, in CACHE/logs/timings.json under `key`."""
    loads = [os.getloadavg()[0]]
    finished = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(loads, finished), daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        finished.set()
        sampler.join()
    loads.append(os.getloadavg()[0])
    seconds = time.perf_counter() - start
    timings_file = cache / "logs/timings.json"
    timings = read_json(timings_file) if timings_file.is_file() else {}
    timings[key] = {
        "seconds": round(seconds, 1),
        "load": {
            "start": loads[0],
            "end": loads[-1],
            "mean": round(sum(loads) / len(loads), 2),
            "max": max(loads),
        },
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
    }
    write_json(timings_file, timings)
    print(f"{key}: {seconds:.0f} s, load {loads[0]:.1f} -> {loads[-1]:.1f}", flush=True)


def _sample_load(loads: list[float], finished: threading.Event) -> None:
    while not finished.wait(LOAD_INTERVAL):
        loads.append(os.getloadavg()[0])


def is_done(cache: Path, key: str, stamp: dict, output: Path) -> bool:
    """Whether `output` exists and was made from the inputs and command described by `stamp`."""
    return output.exists() and done_stamp(cache, key) == stamp


def done_stamp(cache: Path, key: str) -> dict | None:
    marker = done_marker(cache, key)
    return read_json(marker) if marker.is_file() else None


def mark_done(cache: Path, key: str, stamp: dict) -> None:
    write_json(done_marker(cache, key), stamp)


def done_marker(cache: Path, key: str) -> Path:
    return cache / "logs/done" / f"{key.replace(' ', '-')}.json"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_tool(args: argparse.Namespace, key: str, command: list[str], output: Path, stamp: dict):
    """Run a fusion-llm command unless `output` is done from the same `stamp`; log and time it."""
    if not args.force and is_done(args.cache, key, stamp, output):
        print(f"{key}: done already ({output})", flush=True)
        return
    logs = args.cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = ["nice", "-n", "10", *command]
    log_file = logs / f"{key.replace(' ', '-')}.log"
    print("$ " + shlex.join(command), flush=True)
    done_marker(args.cache, key).unlink(missing_ok=True)  # a run that fails half-way is not done
    with timed(args.cache, key, shlex.join(command)), log_file.open("w") as log:
        call(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
    mark_done(args.cache, key, stamp)
    print(f"{key}: log {log_file}", flush=True)


def own_command(args: argparse.Namespace, step: str, *options: str) -> str:
    """The command that runs one in-process step of this script (for the report)."""
    script = Path(__file__).resolve().parent  # the folder scripts/real_models runs as a script
    return shlex.join(["python", str(script), step, "--cache", str(args.cache), *options])


def in_process_priority(threads: int) -> None:
    """In-process model steps run as the tool steps do: niceness 10, `threads` torch threads."""
    import torch

    os.nice(max(0, 10 - os.nice(0)))
    torch.set_num_threads(threads)


def call(command: list[str], **kwargs) -> None:
    subprocess.run(command, check=True, **kwargs)


def read_json(path: Path):
    return json.loads(path.read_text())


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)  # a run killed mid-write leaves the previous file whole


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def expert_stamp(cache: Path, task: str) -> dict | None:
    """What the expert was trained from: a step that reads the expert is redone when it changes."""
    return done_stamp(cache, f"train {task}")
