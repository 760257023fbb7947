"""Task arithmetic in weight space: one merged expert from several task experts.

    theta_merged = theta_S + sum_t lambda_t (theta_t - theta_S)        (lambda_t = ExpertSpec.alpha)

Full checkpoints: the sum runs over every parameter tensor (`merge_state_dicts`). LoRA adapters on
the small base: theta_t - theta_S = B_t A_t * scale_t, and peft's `add_weighted_adapter` with
`combination_type="cat"` stacks the adapters into one of rank sum_t r_t whose update is exactly
sum_t lambda_t B_t A_t * scale_t. A set mixing LoRA and full experts is not merged (no common form).

The engine runs only the experts its config names, so a merged expert is written to disk once per
expert set (`WeightComposer.config_for`) and run by an engine over a config with the set's experts
and the merged one (last).
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from ..core.config import ExpertSpec, FusionConfig
from ..core.errors import RequestError
from ..engine import FusionEngine
from ..runtime.models import load_model

Tensor = torch.Tensor
DEFAULT_FOLDER = Path(tempfile.gettempdir()) / "fusion-llm-merged"
_write_lock = threading.Lock()  # one writer per merged expert, across composers
MERGE_ADAPTER = "fusion_merge"  # the merge's adapter name while it is built inside the PeftModel


def merge_state_dicts(
    base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], lambdas: Sequence[float]
) -> dict[str, Tensor]:
    """theta_S + sum_t lambda_t (theta_t - theta_S), tensor by tensor (computed in float32)."""
    merged = {}
    for key, theta_base in base.items():
        delta = sum(
            lam * (expert[key].float() - theta_base.float())
            for expert, lam in zip(experts, lambdas, strict=True)
        )
        merged[key] = (theta_base.float() + delta).to(theta_base.dtype)
    return merged


def merge_full_experts(
    base: PreTrainedModel, experts: Sequence[PreTrainedModel], lambdas: Sequence[float]
) -> PreTrainedModel:
    """A copy of the small base carrying the merged weights of full-checkpoint experts."""
    merged = copy.deepcopy(base)
    states = [e.state_dict() for e in experts]
    merged.load_state_dict(merge_state_dicts(base.state_dict(), states, lambdas))
    return merged.eval()


def merge_lora_adapters(
    model: PeftModel, names: Sequence[str], lambdas: Sequence[float], merged_name: str
) -> str:
    """Add adapter `merged_name` = sum_t lambda_t (B_t A_t scale_t) to `model` (once); its name."""
    if merged_name not in model.peft_config:
        model.add_weighted_adapter(list(names), list(lambdas), merged_name, combination_type="cat")
    return merged_name


def merged_expert_name(experts: Sequence[str]) -> str:
    """`a__b` for experts a and b, in order (valid as an expert name)."""
    return "__".join(experts)


class WeightComposer:
    """Merged experts of one engine, written under `folder` once per expert set.

    `config_for(experts)` is the engine config with those experts and, last, the merged one; engines built
    from equal configs are shared (`fusion_llm.routing.client.shared_engine`), so each set loads once.
    """

    def __init__(self, engine: FusionEngine, folder: str | Path | None = None):
        self.engine = engine
        self.folder = Path(folder) if folder else DEFAULT_FOLDER

    def config_for(self, experts: Sequence[str]) -> FusionConfig:
        if len(experts) < 2:
            msg = f"weight composition merges two or more experts, got {list(experts)}"
            raise RequestError(msg)
        config = self.engine.config
        specs = {e.name: e for e in config.experts}
        unknown = [e for e in experts if e not in specs]
        if unknown:
            msg = f"unknown expert(s) {unknown}; configured experts: {', '.join(specs)}"
            raise RequestError(msg)
        name = merged_expert_name(experts)
        lambdas = [specs[e].alpha for e in experts]
        target = self.folder / _folder_name(config, experts, lambdas)
        with _write_lock:
            if not target.exists():
                self._write(experts, lambdas, target)
        kind = "lora" if (target / "adapter_config.json").exists() else "full"
        merged = ExpertSpec(name=name, path=str(target), kind=kind, device=config.small.device)
        return config.model_copy(update={"experts": [*(specs[e] for e in experts), merged]})

    def _write(self, experts: Sequence[str], lambdas: list[float], target: Path) -> None:
        models = self.engine.models
        lora = [e in models.lora_experts for e in experts]
        if all(lora):
            # The small PeftModel is shared with generation: hold the engine's lock while editing it.
            with self.engine.exclusive():
                peft_model = models.small.model
                adapters = [models.lora_experts[e] for e in experts]
                merge_lora_adapters(peft_model, adapters, lambdas, MERGE_ADAPTER)
                staging = target.parent / f".{target.name}"
                peft_model.save_pretrained(staging, selected_adapters=[MERGE_ADAPTER])
                peft_model.delete_adapter(MERGE_ADAPTER)
            (staging / MERGE_ADAPTER).rename(target)  # peft saves it in a subfolder
            shutil.rmtree(staging)
            return
        if any(lora):
            msg = f"cannot merge LoRA and full experts in weight space ({list(experts)}); merge one kind"
            raise RequestError(msg)
        small = load_model(self.engine.config.small, "small base").model  # without LoRA layers
        merged = merge_full_experts(small, [models.full_experts[e].model for e in experts], lambdas)
        merged.save_pretrained(target)
        models.small.tokenizer.save_pretrained(target)


def _folder_name(config: FusionConfig, experts: Sequence[str], lambdas: Sequence[float]) -> str:
    """Merged-expert folder: the names, plus a hash of the sources and lambdas."""
    specs = {e.name: e for e in config.experts}
    key = repr(
        [(config.small.path, specs[e].path, lam) for e, lam in zip(experts, lambdas, strict=True)]
    )
    return f"{merged_expert_name(experts)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
