"""The large fine-tuned baselines of Tables 1 and 2: large full fine-tune, large LoRA and large
multi-task fine-tune.

They are not shipped (they would more than double the package), so quick mode reads the scores that
`fusion-llm reproduce --full` measured and that were committed in `zoo/results/baselines.json`;
`--full` retrains them with the zoo recipe (`train_baselines`) and evaluates them with the same
prompts and decoding as every other row.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.errors import ModelNotFoundError
from ..zoo import MODELS_DIR

COMMITTED_RESULTS = MODELS_DIR.parent / "results" / "baselines.json"


def load_committed(path: Path = COMMITTED_RESULTS) -> dict:
    """{"n", "max_new_tokens", "rows": {row name: {task: score, "avg": mean}}}."""
    if not path.exists():
        msg = f"no committed baseline results at {path}; run `fusion-llm reproduce --full`"
        raise ModelNotFoundError(msg)
    return json.loads(path.read_text())


def loadable_baselines(
    trained: dict[str, dict], models_dir: Path, work_dir: Path
) -> dict[str, Path]:
    """{model name: folder the engine can load as its large model}. Full fine-tunes are used as
    saved; each LoRA adapter is merged into the large base once, into `work_dir` (the engine's
    large model is a plain checkpoint, and a merged adapter runs exactly the large base's forwards).
    """
    folders = {}
    for name, entry in trained.items():
        folder = Path(entry["path"])
        if entry["kind"] == "lora":
            folder = merge_lora(folder, models_dir / "large", work_dir / name)
        folders[name] = folder
    return folders


def merge_lora(adapter_dir: Path, base_dir: Path | str, out_dir: Path, half: bool = True) -> Path:
    """The LoRA adapter merged into its base, saved (fp16 when `half`) with the adapter's tokenizer."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    (merged.half() if half else merged).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return out_dir
