"""Loading the large base, the small base and the experts, and checking that they can be fused.

Everything goes through transformers' `from_pretrained` (local folder or hub id) and peft for LoRA
adapters. All LoRA experts are loaded as named adapters on ONE small base (a `PeftModel`), so the
small base and every LoRA expert run as rows of a single forward (`adapter_names` per row); full
experts are separate models. Safe by default: safetensors only and no remote code unless opted in.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .config import ExpertSpec, FusionConfig, ModelSpec
from .errors import (
    AdapterMismatchError,
    DeviceError,
    ModelLoadError,
    ModelNotFoundError,
    VocabularyMismatchError,
)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, where its inputs go and how long its context is."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    input_device: torch.device
    context_window: int | None
    logits_size: int


@dataclass
class ModelSet:
    """All loaded models; `vocab_size` is the common id prefix the fusion runs on."""

    large: LoadedModel
    small: LoadedModel  # a PeftModel carrying every LoRA expert as a named adapter, if any
    full_experts: dict[str, LoadedModel] = field(default_factory=dict)
    lora_experts: list[str] = field(default_factory=list)
    vocab_size: int = 0


def resolve_device(spec: ModelSpec) -> str:
    """`auto` -> cuda, then mps, then cpu; an explicit accelerator must exist."""
    if spec.device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = spec.device.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        msg = f"device {spec.device!r} requested for {spec.path!r} but CUDA is not available; use device: cpu or auto"
        raise DeviceError(msg)
    if kind == "mps" and not torch.backends.mps.is_available():
        msg = f"device 'mps' requested for {spec.path!r} but MPS is not available; use device: cpu or auto"
        raise DeviceError(msg)
    return spec.device


def resolve_dtype(spec: ModelSpec, device: str) -> torch.dtype | str:
    """`auto`: float32 on CPU (half precision is slow there), the checkpoint's dtype elsewhere."""
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return torch.float32 if device == "cpu" and spec.device_map is None else "auto"


def load_model(
    spec: ModelSpec, name: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> LoadedModel:
    """Load one full checkpoint (and its tokenizer unless one is given)."""
    _require_location(spec.path, name)
    device = resolve_device(spec)
    kwargs = {
        "dtype": resolve_dtype(spec, device),
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": None if spec.allow_pickle else True,
    }
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(spec, name, err) from err
    if spec.device_map is None:
        model.to(device)
    model.eval()
    if tokenizer is None:
        tokenizer = load_tokenizer(spec, name)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        input_device=model.get_input_embeddings().weight.device,
        context_window=context_window(model),
        logits_size=model.get_output_embeddings().weight.shape[0],
    )


def load_tokenizer(spec: ModelSpec, name: str) -> PreTrainedTokenizerBase:
    location = spec.tokenizer or spec.path
    _require_location(location, f"{name} tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as err:
        msg = f"could not load the tokenizer of {name} from {location!r}: {_first_line(err)}"
        raise ModelLoadError(msg) from err
    if tokenizer.pad_token_id is None:  # batching needs a pad id; its embedding is never attended
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def context_window(model: PreTrainedModel) -> int | None:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _has_tokenizer(spec: ModelSpec) -> bool:
    """False for a local checkpoint saved without tokenizer files: it then reads the small base's."""
    folder = Path(spec.path)
    if spec.tokenizer or not folder.is_dir():
        return True
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return any((folder / name).is_file() for name in names)


def is_lora_adapter(spec: ExpertSpec) -> bool:
    if spec.kind != "auto":
        return spec.kind == "lora"
    return (Path(spec.path) / "adapter_config.json").is_file()


def load_models(config: FusionConfig) -> ModelSet:
    """Load everything the config names, check vocabularies, attach LoRA adapters to the small base."""
    large = load_model(config.large, "large base")
    small = load_model(config.small, "small base")
    lora_specs = [e for e in config.experts if is_lora_adapter(e)]
    full_experts = {
        e.name: load_model(e, f"expert {e.name!r}", None if _has_tokenizer(e) else small.tokenizer)
        for e in config.experts
        if not is_lora_adapter(e)
    }
    vocab_size = check_vocabularies([large, small, *full_experts.values()])
    if lora_specs:
        small.model = _attach_adapters(small, lora_specs)
    return ModelSet(
        large=large,
        small=small,
        full_experts=full_experts,
        lora_experts=[e.name for e in lora_specs],
        vocab_size=vocab_size,
    )


def check_vocabularies(models: list[LoadedModel]) -> int:
    """Size of the id prefix on which all models agree; raises on any real disagreement.

    Tokenizers are compared token by token. Trailing ids that only some models have are allowed
    when they are special tokens (a pad token added by fine-tuning, 32000 vs 32001), and then the
    fusion runs on the common prefix; a token that differs at the same id is an error.
    """
    reference = models[0]
    ref_tokens = _id_to_token(reference.tokenizer)
    common = min(m.logits_size for m in models)
    for other in models[1:]:
        tokens = _id_to_token(other.tokenizer)
        shared = min(len(ref_tokens), len(tokens))
        for i in range(shared):
            if ref_tokens[i] != tokens[i]:
                msg = (
                    f"vocabulary mismatch between the {reference.name} ({len(ref_tokens)} tokens) and "
                    f"the {other.name} ({len(tokens)} tokens): id {i} is {ref_tokens[i]!r} vs "
                    f"{tokens[i]!r}; every model must use the same tokenizer"
                )
                raise VocabularyMismatchError(msg)
        longer, tail = (reference, ref_tokens) if len(ref_tokens) > shared else (other, tokens)
        _require_special_tail(longer, tail[shared:], shared, reference, other)
        common = min(common, max(shared, 1))
    return common


def _id_to_token(tokenizer: PreTrainedTokenizerBase) -> list[str | None]:
    vocab = tokenizer.get_vocab()
    tokens: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, idx in vocab.items():
        tokens[idx] = token
    return tokens


def _require_special_tail(
    longer: LoadedModel, tail: list[str | None], start: int, a: LoadedModel, b: LoadedModel
) -> None:
    special = set(longer.tokenizer.all_special_tokens) | {
        t.content for t in longer.tokenizer.added_tokens_decoder.values() if t.special
    }
    for offset, token in enumerate(tail):
        if token is not None and token not in special:
            msg = (
                f"vocabulary mismatch between the {a.name} and the {b.name}: the {longer.name} has "
                f"extra id {start + offset} = {token!r}, which is not a special token; only extra "
                "special tokens (e.g. an added pad token) can be ignored"
            )
            raise VocabularyMismatchError(msg)


def _attach_adapters(small: LoadedModel, specs: list[ExpertSpec]) -> PeftModel:
    base_class = type(small.model).__name__
    model: PeftModel | None = None
    for spec in specs:
        _require_location(spec.path, f"expert {spec.name!r}")
        _check_adapter_base(spec, base_class, small.model.name_or_path)
        try:
            if model is None:
                model = PeftModel.from_pretrained(small.model, spec.path, adapter_name=spec.name)
            else:
                model.load_adapter(spec.path, adapter_name=spec.name)
        except RuntimeError as err:  # load_state_dict: size mismatch
            msg = (
                f"LoRA expert {spec.name!r} at {spec.path!r} does not fit the small base "
                f"{small.model.name_or_path!r} (different hidden size or layers): {_first_line(err)}; "
                "train the adapter on the configured small base"
            )
            raise AdapterMismatchError(msg) from err
        except ValueError as err:  # target modules missing from the base
            msg = f"LoRA expert {spec.name!r} does not fit the small base: {_first_line(err)}"
            raise AdapterMismatchError(msg) from err
    assert model is not None
    model.eval()
    return model


def _check_adapter_base(spec: ExpertSpec, base_class: str, small_path: str) -> None:
    config_file = Path(spec.path) / "adapter_config.json"
    if not config_file.is_file():
        return  # a hub adapter: peft checks shapes while loading
    adapter = json.loads(config_file.read_text())
    if adapter.get("peft_type", "LORA") != "LORA":
        msg = f"expert {spec.name!r} is a {adapter['peft_type']} adapter; only LoRA adapters are supported"
        raise AdapterMismatchError(msg)
    trained_on = (adapter.get("auto_mapping") or {}).get("base_model_class")
    if trained_on and trained_on != base_class:
        msg = (
            f"LoRA expert {spec.name!r} was trained on a {trained_on} but the small base is a "
            f"{base_class}; configure the small base the adapter was trained on"
        )
        raise AdapterMismatchError(msg)
    declared = adapter.get("base_model_name_or_path")
    if declared and Path(declared).name != Path(small_path).name:
        # Only a hint: folders move, so the shapes (checked while loading) are what decide.
        warnings.warn(
            f"LoRA expert {spec.name!r} declares base {declared!r} but the small base is "
            f"{small_path!r}; make sure the adapter was trained on it",
            stacklevel=3,
        )


def _require_location(location: str, what: str) -> None:
    # "org/name" may be a hub id (even "Qwen/Qwen2-0.5B", which has a dot); these cannot be.
    looks_local = location.startswith((".", "/", "~")) or location.count("/") > 1
    if looks_local and not Path(location).expanduser().exists():
        msg = f"{what}: path {location!r} does not exist; give a model folder or a hub id"
        raise ModelNotFoundError(msg)


def _load_error(spec: ModelSpec, name: str, err: Exception) -> ModelLoadError:
    text = _first_line(err)
    if not spec.allow_pickle and "safetensors" in text.lower():
        msg = (
            f"could not load the {name} from {spec.path!r}: no safetensors weights found ({text}); "
            "convert the checkpoint to safetensors or set allow_pickle: true if you trust it"
        )
        return ModelLoadError(msg)
    if not Path(spec.path).exists():
        msg = f"could not load the {name} from {spec.path!r}: not a local folder and not reachable on the hub ({text})"
        return ModelNotFoundError(msg)
    return ModelLoadError(f"could not load the {name} from {spec.path!r}: {text}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
