"""The server's one flat config: every field is a `--flag` of `python -m rl.server`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rl.cli import doc
from rl.models import SMOLLM2, cache_dir


@dataclass(frozen=True)
class ServerConfig:
    host: str = doc(
        "127.0.0.1",
        "Address to bind. Keep loopback unless the machine sits behind your own proxy.",
    )
    port: int = doc(
        8000,
        "TCP port; 0 picks a free one (printed at start).",
    )
    keys_file: str = doc(
        "",
        "API keys file; empty = $ENGINEROOM_HOME/server/keys.json.",
    )
    home: str = doc(
        "",
        "Server state (run records); empty = $ENGINEROOM_HOME/server.",
    )
    checkpoint_dir: str = doc(
        "",
        "Where checkpoints are written; empty = <home>/checkpoints.",
    )
    models: str = doc(
        SMOLLM2,
        "Comma-separated base models this server trains and samples (built-in names or local HF directories). Requests for any other model are refused.",
    )
    max_context_length: int = doc(
        2048,
        "Longest sequence (prompt + reply) the samplers accept, advertised to clients.",
    )
    trainer_threads: int = doc(
        0,
        "torch threads of the trainer (0 = all cores).",
    )
    trainer_world_size: int = doc(
        1,
        "Trainer ranks: N > 1 shards each base model over N Ray actors (FSDP2).",
    )
    trainer_dtype: str = doc(
        "auto",
        "Trainer base-weight dtype: auto | float32 | bfloat16.",
    )
    trainer_num_gpus: float | None = doc(
        None,
        "Ray GPUs per trainer (None: 1 on a GPU cluster, else 0; 0.5 shares a GPU with a sampler).",
    )
    trainer_resources: str = doc(
        "",
        "Custom Ray resources per trainer, 'name=amount,...' (pins trainers to such nodes).",
    )
    trainer_placement_strategy: str = doc(
        "PACK",
        "Ray placement-group strategy of a trainer's reservation: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD.",
    )
    gradient_checkpointing: bool = doc(
        False,
        "Trainer: recompute activations in the backward pass (less memory, same gradients).",
    )
    sampler_engine: str = doc(
        "auto",
        "Sampler engine: auto (vLLM where installed) | vllm | torch.",
    )
    sampler_num_gpus: float | None = doc(
        None,
        "Ray GPUs per sampler actor (None: 0.25 on a GPU cluster, else 0).",
    )
    sampler_resources: str = doc(
        "",
        "Custom Ray resources per sampler actor, 'name=amount,...' (pins samplers to such nodes).",
    )
    gpu_memory_utilization: float = doc(
        0.3,
        "vLLM on GPU: share of the GPU's memory per sampler engine (weights + KV cache).",
    )
    tensor_parallel_size: int = doc(
        1,
        "vLLM on GPU: GPUs one sampler engine shards the model over.",
    )
    sampler_threads: int = doc(
        0,
        "torch threads per sampler engine (0 = all cores).",
    )
    sampler_dtype: str = doc(
        "auto",
        "Sampler weights dtype: auto (the checkpoint's) | float32 | bfloat16.",
    )
    sync_mode: str = doc(
        "auto",
        "Weight sync to samplers: auto | adapter | merged (see samplers/config.py).",
    )
    max_lora_rank: int = doc(
        32,
        "Largest LoRA rank the samplers accept (vLLM: 1, 8, 16, 32, 64, ...).",
    )
    enforce_eager: bool = doc(
        False,
        "vLLM without graph compilation (faster start, slower generation).",
    )
    max_body_mib: float = doc(
        64.0,
        "Largest request body, MiB; a larger one gets HTTP 413.",
    )
    max_inflight_samples: int = doc(
        512,
        "Sample requests in flight over all tenants before new ones get HTTP 429 (back-off).",
    )
    max_chunk_datums: int = doc(
        1024,
        "Datums per forward_backward request the SDK sends; larger batches come as chunks.",
    )
    long_poll_s: float = doc(
        20.0,
        "How long retrieve_future holds a pending request before answering try_again.",
    )
    verbose: bool = doc(
        False,
        "Log every request.",
    )

    def resolved_home(self) -> Path:
        return Path(self.home).expanduser() if self.home else cache_dir() / "server"

    def resolved_keys_file(self) -> Path:
        if self.keys_file:
            return Path(self.keys_file).expanduser()
        return self.resolved_home() / "keys.json"

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).expanduser()
        return self.resolved_home() / "checkpoints"

    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]
