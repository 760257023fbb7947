"""Loading the large base, the small base and the experts, and checking that they can be fused.

Everything goes through transformers' `from_pretrained` (local folder or hub id) and peft for LoRA
adapters. All LoRA experts are loaded as named adapters on ONE small base (a `PeftModel`), so the
small base and every LoRA expert run as rows of a single forward (`adapter_names` per row); full
experts are separate models. Safe by default: safetensors only and no remote code unless opted in.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..core.config import ExpertSpec, FusionConfig, ModelSpec
from ..core.errors import (
    AdapterMismatchError,
    DeviceError,
    ModelLoadError,
    ModelNotFoundError,
    VocabularyMismatchError,
    described,
    first_line,
)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# LoRA variants peft cannot run as rows of one mixed-adapter forward (`adapter_names`): such an
# expert is merged into its own copy of the small base and runs as a full expert instead.
UNBATCHABLE_LORA = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, where its inputs go and how long its context is."""

    name: str
    model: PreTrainedModel | None  # None: another engine (vLLM) holds the weights
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
    # expert name -> its adapter name inside the PeftModel: peft reserves "__base__" and cannot
    # take a "." or an nn.Module attribute name ("eval"), so experts get neutral adapter names.
    lora_experts: dict[str, str] = field(default_factory=dict)
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
    _check_model_folder(spec, name)
    device = resolve_device(spec)
    kwargs = {
        "dtype": resolve_dtype(spec, device),
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": None if spec.allow_pickle else True,
        "output_loading_info": True,
    }
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    try:
        model, info = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except Exception as err:  # corrupt files, shapes unlike config.json, unknown architectures
        raise _load_error(spec, name, err) from err
    if info.get("missing_keys"):  # transformers would fill them with random weights
        missing = sorted(info["missing_keys"])
        msg = (
            f"could not load the {name} from {spec.path!r}: its weights lack {len(missing)} "
            f"tensor(s) that config.json requires (e.g. {', '.join(missing[:3])}); the checkpoint "
            "is incomplete or belongs to another config"
        )
        raise ModelLoadError(msg)
    if spec.device_map is None:
        model.to(device)
    model.eval()
    # transformers hands the head the last positions as a strided view of [B, S, H]; for such an
    # input torch's bfloat16 CPU matmul copies the head weight once per row (measured: 265 MB a
    # row for a 151 936 x 896 head, so a 40-row fused prefill ran out of 24 GiB), a contiguous
    # input copies nothing.
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
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


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def load_tokenizer(spec: ModelSpec, name: str) -> PreTrainedTokenizerBase:
    location = spec.tokenizer or spec.path
    _require_location(location, f"{name} tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (
        Exception
    ) as err:  # a tokenizer.json of another schema raises KeyError, bad JSON ValueError
        msg = (
            f"could not load the tokenizer of {name} from {location!r} ("
            f"{described(err)}); its tokenizer files (tokenizer.json, tokenizer_config.json) are "
            "damaged or of an unsupported format: re-save them with save_pretrained"
        )
        raise ModelLoadError(msg) from err
    if tokenizer.pad_token_id is None:  # batching needs a pad id; its embedding is never attended
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def context_window(model: PreTrainedModel) -> int | None:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return _config_window(config)


def _config_window(config) -> int | None:
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


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No weight-loading progress bars and no deprecation notices from the libraries while models
    load: loading takes a second or two per model, and these would print on every engine."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", category=FutureWarning, module=r"(transformers|peft)\."
            )
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_models(config: FusionConfig, large_weights: bool = True) -> ModelSet:
    """Load everything the config names, check vocabularies, attach LoRA adapters to the small base.

    `large_weights=False`: the large model is only described (tokenizer, context window, logits
    size), for a backend that runs it itself."""
    with quiet_loading():
        return _load_models(config, large_weights)


def _load_models(config: FusionConfig, large_weights: bool) -> ModelSet:
    large = shared_large_model(config.large) if large_weights else describe_model(config.large)
    small = load_model(config.small, "small base")
    lora_specs = [e for e in config.experts if is_lora_adapter(e)]
    adapter_configs = {e.name: _read_adapter_config(e) for e in lora_specs}
    for spec in lora_specs:
        _check_adapter_base(spec, adapter_configs[spec.name], small)
    merged = [e for e in lora_specs if _unbatchable(adapter_configs[e.name])]
    batched = [e for e in lora_specs if e not in merged]
    full_experts = {}
    for spec in config.experts:
        if spec in merged:
            full_experts[spec.name] = _merged_lora_expert(config.small, spec, small)
        elif spec not in lora_specs:
            tokenizer = None if _has_tokenizer(spec) else small.tokenizer
            full_experts[spec.name] = load_model(spec, f"expert {spec.name!r}", tokenizer)
    models = [large, small, *full_experts.values()]
    vocab_size = check_vocabularies(models)
    for loaded in models:
        _check_embeddings(loaded, vocab_size)
    adapters = {e.name: f"expert{i}" for i, e in enumerate(batched)}
    if batched:
        small.model = _attach_adapters(small, batched, adapters)
    return ModelSet(
        large=large,
        small=small,
        full_experts=full_experts,
        lora_experts=adapters,
        vocab_size=vocab_size,
    )


_large_models: weakref.WeakValueDictionary[str, LoadedModel] = weakref.WeakValueDictionary()
_large_models_lock = threading.Lock()


def shared_large_model(spec: ModelSpec) -> LoadedModel:
    """The large base of `spec`, loaded once per process while an engine holds it: engines that
    differ only in their experts (e.g. merged experts under compose="weights") share it. It is
    only read (eval mode, no adapters), so several decoders may run it."""
    key = spec.model_dump_json()
    with _large_models_lock:
        loaded = _large_models.get(key)
        if loaded is None:
            loaded = load_model(spec, "large base")
            _large_models[key] = loaded
        return loaded


def describe_model(spec: ModelSpec, name: str = "large base") -> LoadedModel:
    """A model's tokenizer, context window and logits size, read from its config without its
    weights."""
    _require_location(spec.path, name)
    try:
        config = AutoConfig.from_pretrained(
            spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except Exception as err:  # a missing or damaged config.json
        raise _load_error(spec, name, err) from err
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LoadedModel(
        name=name,
        model=None,
        tokenizer=load_tokenizer(spec, name),
        input_device=torch.device(resolve_device(spec)),
        context_window=_config_window(text),
        logits_size=text.vocab_size,
    )


def _check_embeddings(loaded: LoadedModel, vocab_size: int) -> None:
    """Every id its tokenizer or the fused sampler can produce must have an input embedding."""
    if loaded.model is None:
        return  # its engine checks its own embeddings
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    needed = max(len(loaded.tokenizer), vocab_size)
    if rows < needed:
        msg = (
            f"the {loaded.name} has {rows} input embeddings but its tokenizer has {len(loaded.tokenizer)} "
            f"ids (fused vocabulary: {vocab_size}): ids >= {rows} would fail on every call; resize "
            "its embeddings (model.resize_token_embeddings(len(tokenizer))) and fine-tune, or give "
            "it the tokenizer it was trained with"
        )
        raise ModelLoadError(msg)


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


def _attach_adapters(
    small: LoadedModel, specs: list[ExpertSpec], adapters: dict[str, str]
) -> PeftModel:
    """Every spec as a named adapter (`adapters[spec.name]`) on ONE PeftModel over the small base."""
    model: PeftModel | None = None
    for spec in specs:
        try:
            if model is None:
                model = PeftModel.from_pretrained(
                    small.model, spec.path, adapter_name=adapters[spec.name]
                )
            else:
                model.load_adapter(spec.path, adapter_name=adapters[spec.name])
        except Exception as err:
            raise _adapter_error(spec, small, err) from err
    assert model is not None
    model.eval()
    return model


def _merged_lora_expert(small_spec: ModelSpec, spec: ExpertSpec, small: LoadedModel) -> LoadedModel:
    """A LoRA variant the batched forward cannot run, merged into its own copy of the small base."""
    base = load_model(small_spec, f"small base of expert {spec.name!r}", small.tokenizer)
    try:
        merged = PeftModel.from_pretrained(base.model, spec.path).merge_and_unload()
    except Exception as err:
        raise _adapter_error(spec, small, err) from err
    base.model = merged.eval()
    base.name = f"expert {spec.name!r}"
    return base


def _adapter_error(spec: ExpertSpec, small: LoadedModel, err: Exception) -> AdapterMismatchError:
    msg = (
        f"LoRA expert {spec.name!r} at {spec.path!r} does not fit the small base "
        f"{small.model.name_or_path!r} ({described(err)}); train the "
        "adapter on the configured small base"
    )
    return AdapterMismatchError(msg)


def _unbatchable(adapter: dict | None) -> bool:
    return adapter is not None and any(adapter.get(key) for key in UNBATCHABLE_LORA)


def _read_adapter_config(spec: ExpertSpec) -> dict | None:
    """The adapter's config after every check that needs no model; None for a hub adapter."""
    _require_location(spec.path, f"expert {spec.name!r}")
    folder = Path(spec.path)
    if not folder.is_dir():
        return None  # a hub adapter: peft checks it while loading
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        msg = (
            f"expert {spec.name!r} is configured as kind: lora but {spec.path!r} has no "
            "adapter_config.json; point it at a folder written by a peft model's save_pretrained, "
            "or use kind: full for a full checkpoint"
        )
        raise ModelLoadError(msg)
    try:
        adapter = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        msg = f"expert {spec.name!r}: {str(config_file)!r} is not valid JSON ({first_line(err) or type(err).__name__}); re-save the adapter"
        raise ModelLoadError(msg) from None
    if not isinstance(adapter, dict):
        msg = f"expert {spec.name!r}: {str(config_file)!r} must hold a JSON object, got {type(adapter).__name__}"
        raise ModelLoadError(msg)
    names = {p.name for p in folder.iterdir()}
    if "adapter_model.safetensors" not in names:
        pickled = sorted(
            n for n in names if n.startswith("adapter_model") and n.endswith(PICKLE_SUFFIXES)
        )
        if not pickled:
            msg = (
                f"expert {spec.name!r}: {spec.path!r} has no adapter weights "
                "(adapter_model.safetensors); the adapter was not saved completely"
            )
            raise ModelLoadError(msg)
        if not spec.allow_pickle:
            msg = (
                f"expert {spec.name!r}: {spec.path!r} has only pickle weights ({pickled[0]}), which "
                "can run code when loaded; convert them to adapter_model.safetensors or set "
                "allow_pickle: true if you trust the file"
            )
            raise ModelLoadError(msg)
    return adapter


def _check_adapter_base(spec: ExpertSpec, adapter: dict | None, small: LoadedModel) -> None:
    if adapter is None:
        return  # a hub adapter: peft checks shapes while loading
    if adapter.get("peft_type", "LORA") != "LORA":
        msg = f"expert {spec.name!r} is a {adapter['peft_type']} adapter; only LoRA adapters are supported"
        raise AdapterMismatchError(msg)
    base_class = type(small.model).__name__
    trained_on = (adapter.get("auto_mapping") or {}).get("base_model_class")
    if trained_on and trained_on != base_class:
        msg = (
            f"LoRA expert {spec.name!r} was trained on a {trained_on} but the small base is a "
            f"{base_class}; configure the small base the adapter was trained on"
        )
        raise AdapterMismatchError(msg)
    declared = adapter.get("base_model_name_or_path")
    small_path = small.model.name_or_path
    if declared and Path(declared).name != Path(small_path).name:
        # Only a hint: folders move, so the shapes (checked while loading) are what decide.
        warnings.warn(
            f"LoRA expert {spec.name!r} declares base {declared!r} but the small base is "
            f"{small_path!r}; make sure the adapter was trained on it",
            stacklevel=3,
        )


def _require_location(location: str, what: str) -> None:
    """A location that is no local folder must be a hub id, and the hub must be reachable.

    Offline, from_pretrained retries a missing id for minutes: fail at once instead.
    """
    if Path(location).expanduser().exists():
        return
    # "org/name" may be a hub id (even "Qwen/Qwen2-0.5B", which has a dot); these cannot be.
    if location.startswith((".", "/", "~")) or location.count("/") > 1:
        msg = f"{what}: path {location!r} does not exist; give a model folder or a hub id"
        raise ModelNotFoundError(msg)
    if not hub_reachable():
        msg = (
            f"{what}: {location!r} is not a local folder (relative to {os.getcwd()!r}) and the model "
            f"hub ({_hub_endpoint()}) cannot be reached to look it up as a hub id; fix the path, or "
            "go online (HF_HUB_OFFLINE is respected)"
        )
        raise ModelNotFoundError(msg)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection (False under HF_HUB_OFFLINE); asked once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    reachable: list[bool] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            reachable.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s)
    return bool(reachable)


def _check_model_folder(spec: ModelSpec, name: str) -> None:
    """A local folder must hold a model: config.json and weights of an allowed format."""
    folder = Path(spec.path)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        if "adapter_config.json" in names:
            hint = (
                "configure it with kind: lora (or kind: auto)"
                if name.startswith("expert")
                else "the bases must be full checkpoints: merge the adapter first "
                "(PeftModel.merge_and_unload) or use it as an expert"
            )
            msg = f"the {name} at {spec.path!r} is a LoRA adapter folder (adapter_config.json), not a full model; {hint}"
        else:
            msg = f"the {name} at {spec.path!r} has no config.json; point it at a folder written by save_pretrained"
        raise ModelLoadError(msg)
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if not pickled:
        msg = f"the {name} at {spec.path!r} has no weights (*.safetensors); the checkpoint was not saved completely"
        raise ModelLoadError(msg)
    if not spec.allow_pickle:
        msg = (
            f"could not load the {name} from {spec.path!r}: no safetensors weights found, only "
            f"pickle files ({pickled[0]}), which can run code when loaded; convert the checkpoint "
            "to safetensors or set allow_pickle: true if you trust it"
        )
        raise ModelLoadError(msg)


def _load_error(spec: ModelSpec, name: str, err: Exception) -> ModelLoadError:
    text = first_line(err) or type(err).__name__
    where = f"could not load the {name} from {spec.path!r}"
    if type(err).__name__ == "SafetensorError" or "deserializing header" in text:
        msg = f"{where}: a safetensors file is corrupt or truncated ({text}); download or save it again"
        return ModelLoadError(msg)
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        msg = (
            f"{where}: the weights do not match the shapes in its config.json; the config was "
            "edited or belongs to another checkpoint (transformers logs the mismatched tensors)"
        )
        return ModelLoadError(msg)
    if not spec.allow_pickle and "safetensors" in text.lower():
        msg = (
            f"{where}: no safetensors weights found ({text}); "
            "convert the checkpoint to safetensors or set allow_pickle: true if you trust it"
        )
        return ModelLoadError(msg)
    if not Path(spec.path).exists():
        msg = f"{where}: not a local folder and not reachable on the hub ({text})"
        return ModelNotFoundError(msg)
    return ModelLoadError(f"{where}: {type(err).__name__}: {text}")
