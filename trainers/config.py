"""The trainer's slice of configuration: one flat record, every field documented."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class TrainerConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; "auto" picks CUDA when the actor sees a GPU, else the CPU."""

    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Base-weight dtype. "auto": float32 on CPU, bfloat16 on GPU, as the sampler's "auto"
    (rl.models.default_dtype), so both sides agree. Adapters and optimizer state are fp32."""

    num_threads: int = 0
    """torch CPU threads in the trainer process; 0 = all cores of the machine."""

    num_cpus: float = 1.0
    """Logical CPUs the trainer actor reserves in Ray (threads are set by num_threads)."""

    schedule_timeout_s: float = 60.0
    """How long to wait for Ray to find the trainer's resources before raising
    `ResourcesUnavailableError` (rl.resources), instead of waiting forever."""

    max_tokens_per_batch: int = 8192
    """Upper bound on padded tokens in one model call; longer batches are split into buckets."""

    call_overhead_tokens: int = 64
    """Cost of one extra model call, in padded tokens, used when bucketing by length."""

    lora_alpha: float = 32.0
    """LoRA alpha; the adapter's scale is alpha / rank."""

    attn_implementation: str = "sdpa"
    """transformers attention kernel."""

    checkpoint_dir: str = ""
    """Where save_state / save_weights_for_sampler write; "" = $ENGINEROOM_HOME/checkpoints."""

    def __post_init__(self) -> None:
        from rl.errors import InvalidRequestError

        for name, ok in (
            ("num_cpus", self.num_cpus >= 0),
            ("num_threads", self.num_threads >= 0),
            ("schedule_timeout_s", self.schedule_timeout_s > 0),
        ):
            if not ok:
                raise InvalidRequestError(
                    f"TrainerConfig.{name}={getattr(self, name)!r} is out of range"
                )

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).expanduser()
        from rl.models import cache_dir

        return cache_dir() / "checkpoints"

    def uses_gpu(self, cluster_gpus: float) -> bool:
        """Whether the trainer runs on a GPU, in a Ray cluster with `cluster_gpus` GPUs."""
        return self.device == "cuda" or (self.device == "auto" and cluster_gpus > 0)

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The base-weight dtype on a device with (`on_gpu`) or without a GPU."""
        from rl.models import default_dtype

        return default_dtype(on_gpu) if self.dtype == "auto" else self.dtype

    def resolved_threads(self) -> int:
        return self.num_threads or os.cpu_count() or 1
