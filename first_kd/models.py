"""Loading causal LMs and tokenizers by hub id or local path, with one-line errors, and telling models
apart by their weights (`weights_fingerprint`), not by the path they were loaded from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Optional

import torch

from first_kd.config import option
from first_kd.errors import FirstKDError


@dataclasses.dataclass
class ModelOptions:
    """How a model is fetched: the options every command that loads a model shares (cache, distill,
    evaluate, generate), so they mean the same everywhere."""

    revision: Optional[str] = option(None, help="model revision (branch, tag or commit) when loading from a hub")
    trust_remote_code: bool = option(False, help="allow model code from the hub (only for models you trust)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(name_or_path: str, revision=None, trust_remote_code=False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise FirstKDError(f"cannot load a tokenizer from {name_or_path!r} ({type(e).__name__}): check the path "
                           "or hub id (hub ids need a network)") from None
    if tok.pad_token_id is None:
        # Right padding is masked out, so any id works; eos is the conventional choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_model(name_or_path: str, dtype: torch.dtype, device, revision=None, trust_remote_code=False,
               device_map: str = "none", quantization=None):
    """A causal LM in eval mode on `device`; with device_map="auto", spread by accelerate over every visible
    GPU, then CPU memory, for a model larger than one device (`device` is then unused). A LoRA adapter
    directory (first_kd.adapters) loads as its base with the adapters merged in. `quantization`: a
    transformers quantization config (QLoRA's 4-bit base), placed on `device` by transformers."""
    from transformers import AutoModelForCausalLM

    from first_kd.adapters import adapter_base, is_adapter_dir, load_adapter

    if is_adapter_dir(name_or_path):
        base = load_model(adapter_base(name_or_path), dtype, device, revision, trust_remote_code, device_map)
        return load_adapter(base, name_or_path).eval()
    placement = {} if device_map == "none" else {"device_map": device_map}
    if quantization is not None:
        placement = {"quantization_config": quantization, "device_map": {"": torch.device(device).index or 0}}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=dtype,
                                                     trust_remote_code=trust_remote_code, **placement)
    except Exception as e:
        raise FirstKDError(f"cannot load a causal LM from {name_or_path!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}): check the path or hub id") from None
    return (model if placement else model.to(device)).eval()


def load_config(name_or_path: str, revision=None, trust_remote_code=False):
    """A model's transformers config, without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise FirstKDError(f"cannot read a model config from {name_or_path!r} ({type(e).__name__}): check the "
                           "path or hub id") from None


def model_positions(config) -> Optional[int]:
    """The most positions a model config allows (max_position_embeddings, GPT-2's n_positions, ...), or None
    when the config names none."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def generation_config(name_or_path: str, revision=None):
    """A model's generation_config.json (blank when it has none): its eos ids end generated text."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(name_or_path, revision=revision)
    except Exception:
        return GenerationConfig()


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generated answer: the tokenizer's eos and the model's generation eos ids (chat
    models end a turn with a token of their own). Empty when neither defines one. `model` is a model or
    its generation config (`generation_config`)."""
    ids = set()
    config = getattr(model, "generation_config", model)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(ids)


def transformer_body(model):
    """The transformer body of a causal LM (LlamaModel inside LlamaForCausalLM, ...); a LoRA student
    (peft's PeftModel) is unwrapped first, its adapters live inside the body's layers."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise FirstKDError(f"{type(model).__name__} exposes no transformer body (base_model): use a causal LM "
                           "with a separate output head (AutoModelForCausalLM)")
    return body


def last_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, H] final hidden states of a right-padded batch [B, S].

    Every first-kd pass runs the body and applies the output head itself, at the positions it needs
    only: a causal LM's own forward would build [B, S, V] logits, the largest tensor of the step.
    """
    out = transformer_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [N, V] of hidden states [N, H], with the model's final logit soft-capping if any."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# ----------------------------------------------------------------------------------------------
# Model identity: a fingerprint of the weights
# ----------------------------------------------------------------------------------------------

WEIGHTS_METHOD = "safetensors-sampled-v1"
_SAMPLE_BYTES = 4096
_SAMPLES_PER_TENSOR = 4


def weight_files(name_or_path: str, revision: Optional[str] = None) -> list[Path]:
    """A model's safetensors files, found without a network: a local directory, or the hub cache.
    [] when there are none (a .bin-only model, or a hub model not downloaded yet)."""
    local = Path(name_or_path)

    def find(name: str) -> Optional[Path]:
        if local.is_dir():
            return local / name if (local / name).is_file() else None
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(name_or_path, name, revision=revision)
        except Exception:  # not a hub id at all
            return None
        return Path(found) if isinstance(found, str) else None

    index = find("model.safetensors.index.json")
    if index is not None:
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        files = [find(name) for name in names]
        return files if files and all(files) else []
    single = find("model.safetensors")
    return [single] if single is not None else []


def _sample_starts(size: int) -> list[int]:
    """Offsets of the byte windows read from a tensor of `size` bytes: evenly spread, both ends included."""
    if size <= _SAMPLE_BYTES:
        return [0]
    last = size - _SAMPLE_BYTES
    return sorted({round(j * last / (_SAMPLES_PER_TENSOR - 1)) for j in range(_SAMPLES_PER_TENSOR)})


def weights_fingerprint(name_or_path: str, revision: Optional[str] = None) -> Optional[dict]:
    """A cheap fingerprint of a model's weights, or None when it has no safetensors files in reach.

    sha256 over every tensor, by name: its name, dtype, shape and byte size (from the safetensors
    headers) and 4 windows of 4 KiB of its stored bytes (start, end and two between). It reads about
    16 KiB per tensor, about 12 MB for a 70B model, whatever the weights' dtype at load time; it does not
    depend on how the tensors are split into shard files. A fine-tune changes every element of the
    matrices it trains, so two models with different weights differ here (stores record their teacher's,
    so that `calibrate` compares teachers by what they are).
    """
    files = weight_files(name_or_path, revision)
    if not files:
        return None
    h = hashlib.sha256()
    try:
        tensors = {}
        for path in files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            tensors.update({name: (path, 8 + n, info) for name, info in header.items() if name != "__metadata__"})
        handles = {}
        try:
            for name in sorted(tensors):
                path, base, info = tensors[name]
                lo, hi = info["data_offsets"]
                h.update(json.dumps([name, info["dtype"], info["shape"], hi - lo]).encode())
                if path not in handles:
                    handles[path] = open(path, "rb")
                f = handles[path]
                for start in _sample_starts(hi - lo):
                    f.seek(base + lo + start)
                    h.update(f.read(min(_SAMPLE_BYTES, hi - lo - start)))
        finally:
            for f in handles.values():
                f.close()
    except (ValueError, KeyError, TypeError, struct.error):  # not a safetensors file: loading will say so
        return None
    return {"method": WEIGHTS_METHOD, "sha256": h.hexdigest(), "n_tensors": len(tensors)}
