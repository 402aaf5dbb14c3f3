"""LoRA / QLoRA students (PEFT): low-rank adapters trained on a frozen base, the way 1-8B students are
distilled on one GPU (an 8B student with full AdamW needs ~130 GB; its LoRA adapters a few hundred MB).

`add_lora` wraps a loaded student in peft's PeftModel. Everything first-kd runs on a student keeps working
on the wrapper: `first_kd.models.transformer_body` unwraps it, and the output head (never a LoRA target
unless named) stays frozen, so the chunked loss reads its weight as before. A run directory then holds
OUT/adapter (adapter weights + config + tokenizer; `load_model` takes it like a model directory) and, with
--merge-lora, OUT/model: the base with the adapters merged in, loadable by plain `from_pretrained`.

QLoRA (--load-in-4bit) loads the base in 4-bit NF4 through bitsandbytes; it is refused in one line where
bitsandbytes is missing or does not support the device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch

from first_kd.config import option
from first_kd.errors import FirstKDError

ADAPTER_CONFIG = "adapter_config.json"


@dataclasses.dataclass
class LoraOptions:
    lora_r: int = option(0, help="LoRA rank; 0 = full fine-tuning (every weight trains)")
    lora_alpha: float = option(16.0, help="LoRA scaling numerator: adapters are scaled by alpha / r")
    lora_dropout: float = option(0.0, help="dropout on the LoRA input (0 keeps runs exactly reproducible)")
    lora_target_modules: str = option(
        "all-linear", help="modules that get adapters: all-linear (every linear layer but the output head: "
                           "attention and MLP projections) or a comma list of names, e.g. q_proj,v_proj")
    merge_lora: bool = option(False, help="also write OUT/model: the base with the adapters merged in")
    load_in_4bit: bool = option(False, help="QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes; needs "
                                            "--lora-r > 0)")

    def validate_lora(self) -> None:
        if self.lora_r < 0:
            raise FirstKDError(f"--lora-r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if self.lora_r == 0:
            for flag, on in (("--merge-lora", self.merge_lora), ("--load-in-4bit", self.load_in_4bit)):
                if on:
                    raise FirstKDError(f"{flag} needs LoRA adapters: set --lora-r (e.g. 16)")
            return
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise FirstKDError(f"--lora-alpha must be a finite number > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise FirstKDError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not target_modules(self.lora_target_modules):
            raise FirstKDError("--lora-target-modules is empty: give all-linear or names like q_proj,v_proj")


def target_modules(text: str):
    """'all-linear' as peft spells it, else the list of module names."""
    text = text.strip()
    return text if text == "all-linear" else [name.strip() for name in text.split(",") if name.strip()]


def add_lora(model, opts: LoraOptions, base: str):
    """The student wrapped with fresh LoRA adapters (base weights frozen, adapters trainable). `base` is
    what the adapter records as its base: an absolute path for a local model, so it loads from anywhere."""
    from peft import LoraConfig, get_peft_model

    model.name_or_path = str(Path(base).resolve()) if Path(base).is_dir() else base  # peft records this

    if opts.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                        target_modules=target_modules(opts.lora_target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target name the model does not have
        raise FirstKDError(f"cannot add LoRA adapters ({str(e).splitlines()[0][:200]}): check "
                           "--lora-target-modules") from None


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def quantization_config(load_in_4bit: bool, compute_dtype: torch.dtype, device) -> Optional[object]:
    """transformers' BitsAndBytesConfig for a 4-bit base, or None; a FirstKDError where it cannot run."""
    if not load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        raise FirstKDError(f"--load-in-4bit needs bitsandbytes ({type(e).__name__}): pip install -e "
                           "'.[qlora]' on a CUDA machine, or drop --load-in-4bit") from None
    if torch.device(device).type != "cuda":
        raise FirstKDError(f"--load-in-4bit runs on a CUDA GPU; this run is on {torch.device(device).type}: drop "
                           "--load-in-4bit (LoRA alone works everywhere)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_adapter_dir(path: str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str) -> str:
    """The base model an adapter directory was trained on (as recorded by peft)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise FirstKDError(f"{path}/{ADAPTER_CONFIG} names no base model: re-save the adapter with its base")
    return base


def load_adapter(model, path: str):
    """`model` (the base) with the adapters of `path` merged in: a plain model for evaluation."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path).merge_and_unload()
    except Exception as e:
        raise FirstKDError(f"cannot load the LoRA adapter in {path} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None


def trainable_state(model) -> dict:
    """The trainable tensors by name (the adapters of a LoRA student): what a LoRA checkpoint holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
