"""The trainer's config: one record, every field documented under it. Entry points hold it as
their `trainer` sub-config (`trainer.num_gpus=1` on a command line)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
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
    """torch CPU threads in each trainer process; 0 = the machine's cores / world_size."""

    world_size: int = 1
    """Trainer ranks: N > 1 runs the trainer as N Ray actors in one torch.distributed group
    (gloo on CPU, NCCL on GPU), the base model's decoder layers sharded over them (FSDP2) and
    each batch split between them (trainers/distributed.py). Each rank reserves num_cpus /
    num_gpus / resources of its own. Checkpoints do not depend on it."""

    num_cpus: float = 1.0
    """Logical CPUs the trainer actor reserves in Ray (threads are set by num_threads)."""

    num_gpus: float | None = None
    """GPUs the trainer actor reserves in Ray. None: 1 when it runs on a GPU (device "cuda",
    or "auto" in a cluster with GPUs), else 0. A fraction (e.g. 0.5) shares one GPU with a
    colocated vLLM sampler (docs/cluster.md); above 1, whole GPUs only."""

    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources the trainer actor reserves, e.g. {"trainer_node": 1} pins it to
    a node started with `ray start --resources '{"trainer_node": 1}'`."""

    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Strategy of the trainer's Ray placement group (rl.placement.reserve)."""

    schedule_timeout_s: float = 60.0
    """How long to wait for Ray to find the trainer's resources before raising
    `ResourcesUnavailableError` (rl.placement), instead of waiting forever."""

    max_tokens_per_batch: int = 0
    """Most padded tokens in one model call; a larger batch is split into calls, whose
    gradients add up to the batch's. 0: as many as the memory free at the time of the call
    holds (trainers/memory.py); a number caps that too."""

    max_resident_adapters: int = 0
    """Most adapters kept in the model at once; calling another pages it in and the least
    recently used one out (its weights, gradients and AdamW state: trainers/paging.py), with
    the same results. 0: no bound."""

    max_host_adapters: int = 0
    """Paged-out adapters kept in host memory; past it, they go to files under
    `checkpoint_dir` (on a CPU trainer the host is where they were: 0 sends them to disk)."""

    memory_limit_gib: float | None = None
    """Most memory the trainer process may use, its model included, GiB; model calls are sized
    to stay under it. None: what the machine (or the GPU) has free, less a 10% headroom."""

    call_overhead_tokens: int = 64
    """Cost of one extra model call, in padded tokens, used when bucketing by length."""

    shared_prefix_row_tokens: int = 256
    """Datums that share a prefix (an RL group's completions of one prompt) are packed into
    rows as a prefix tree, every shared token computed once (trainers/packing.py); a row holds
    at most this many tokens, since its masked attention costs the square of its length.
    0 turns it off. Only with the "sdpa" and "eager" attention kernels (flash-attn takes no
    custom mask)."""

    shared_prefix_min_tokens: int = 16
    """Datums are packed together only if they share at least this many leading tokens."""

    lora_alpha: float = 32.0
    """LoRA alpha; the adapter's scale is alpha / rank."""

    attn_implementation: str = "auto"
    """transformers attention kernel. "auto": "flash_attention_2" on a GPU in bfloat16 where
    the flash-attn package is installed, else "sdpa" (PyTorch's fused attention, which picks
    its flash / memory-efficient kernels itself on GPU)."""

    logprob_chunk_tokens: int | None = None
    """Tokens per chunk of the output head + log-softmax (trainers/logprobs.py), so no
    [tokens, vocab] float32 tensor of a whole batch is kept. None: 2048 on GPU, unchunked on
    CPU (where the recomputation in the backward pass costs more than the memory saves)."""

    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them: less memory for long sequences (16k tokens), ~30% more compute. Same gradients."""

    checkpoint_dir: str = ""
    """Where save_state / save_weights_for_sampler write; "" = $ENGINEROOM_HOME/checkpoints."""

    def __post_init__(self) -> None:
        from rl.errors import InvalidRequestError

        for name, ok in (
            ("num_cpus", self.num_cpus >= 0),
            ("num_threads", self.num_threads >= 0),
            ("world_size", isinstance(self.world_size, int) and self.world_size >= 1),
            ("schedule_timeout_s", self.schedule_timeout_s > 0),
            ("logprob_chunk_tokens", (self.logprob_chunk_tokens or 0) >= 0),
            ("shared_prefix_row_tokens", self.shared_prefix_row_tokens >= 0),
            ("shared_prefix_min_tokens", self.shared_prefix_min_tokens >= 1),
            ("max_tokens_per_batch", self.max_tokens_per_batch >= 0),
            ("max_resident_adapters", self.max_resident_adapters >= 0),
            ("max_host_adapters", self.max_host_adapters >= 0),
            ("memory_limit_gib", self.memory_limit_gib is None or self.memory_limit_gib > 0),
        ):
            if not ok:
                raise InvalidRequestError(
                    f"TrainerConfig.{name}={getattr(self, name)!r} is out of range"
                )
        from rl.placement import STRATEGIES, check_gpus, check_resources

        if self.placement_strategy not in STRATEGIES:
            raise InvalidRequestError(
                f"TrainerConfig.placement_strategy={self.placement_strategy!r}; expected one "
                f"of {list(STRATEGIES)}"
            )

        if self.num_gpus is not None:
            check_gpus(self.num_gpus, "TrainerConfig.num_gpus")
            if self.device == "cuda" and self.num_gpus == 0:
                raise InvalidRequestError(
                    "TrainerConfig: device='cuda' with num_gpus=0; the trainer actor would see "
                    "no GPU (give it num_gpus > 0, or device='auto' / 'cpu')"
                )
        check_resources(self.resources, "TrainerConfig.resources")
        if self.world_size > 1 and self.max_resident_adapters:
            raise InvalidRequestError(
                "TrainerConfig: max_resident_adapters needs a one-actor trainer (world_size=1); "
                "a sharded trainer keeps every adapter resident"
            )
        if self.world_size > 1 and self.num_gpus is not None and 0 < self.num_gpus < 1:
            raise InvalidRequestError(
                f"TrainerConfig: world_size={self.world_size} with num_gpus={self.num_gpus}; "
                "the ranks of a sharded trainer cannot share a GPU (NCCL needs one per rank)"
            )

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).expanduser()
        from rl.models import cache_dir

        return cache_dir() / "checkpoints"

    def uses_gpu(self, cluster_gpus: float) -> bool:
        """Whether the trainer runs on a GPU, in a Ray cluster with `cluster_gpus` GPUs."""
        return self.device == "cuda" or (self.device == "auto" and cluster_gpus > 0)

    def resolved_gpus(self, cluster_gpus: float) -> float:
        """GPUs the trainer actor reserves, in a Ray cluster with `cluster_gpus` GPUs."""
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if self.uses_gpu(cluster_gpus) else 0.0

    def resolved_chunk_tokens(self, on_gpu: bool) -> int:
        """Tokens per output-head chunk on this device (0: unchunked)."""
        if self.logprob_chunk_tokens is not None:
            return self.logprob_chunk_tokens
        return 2048 if on_gpu else 0

    def resolved_attention(self, on_gpu: bool, dtype: str) -> str:
        """The transformers attention kernel on this device (see `attn_implementation`)."""
        if self.attn_implementation != "auto":
            return self.attn_implementation
        flash = importlib.util.find_spec("flash_attn") is not None
        return "flash_attention_2" if on_gpu and dtype == "bfloat16" and flash else "sdpa"

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The base-weight dtype on a device with (`on_gpu`) or without a GPU."""
        from rl.models import default_dtype

        return default_dtype(on_gpu) if self.dtype == "auto" else self.dtype

    def resolved_threads(self) -> int:
        return self.num_threads or max(1, (os.cpu_count() or 1) // self.world_size)
