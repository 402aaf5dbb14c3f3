"""Loading causal LMs and tokenizers by hub id or local path, with one-line errors."""

from __future__ import annotations

import dataclasses
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


def load_model(name_or_path: str, dtype: torch.dtype, device, revision=None, trust_remote_code=False):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:
        raise FirstKDError(f"cannot load a causal LM from {name_or_path!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}): check the path or hub id") from None
    return model.to(device).eval()


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generated answer: the tokenizer's eos and the model's generation eos ids (chat
    models end a turn with a token of their own). Empty when neither defines one."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(ids)


def transformer_body(model):
    """The transformer body of a causal LM (LlamaModel inside LlamaForCausalLM, ...)."""
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
