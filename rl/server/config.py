"""The server's config: every key is a `--flag` of `python -m rl.server`, the trainer's and the
samplers' own settings as `--trainer.<key>` and `--sampler.<key>` (trainers/config.py,
samplers/config.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rl.errors import InvalidRequestError
from rl.models import SMOLLM2, cache_dir
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind. Keep loopback unless the machine sits behind your own proxy."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at start)."""
    keys_file: str = ""
    """API keys file; empty = $ENGINEROOM_HOME/server/keys.json."""
    home: str = ""
    """Server state (run records); empty = $ENGINEROOM_HOME/server."""
    models: str = SMOLLM2
    """Comma-separated base models this server trains and samples (built-in names or local HF
    directories). Requests for any other model are refused."""
    max_body_mib: float = 64.0
    """Largest request body, MiB; a larger one gets HTTP 413."""
    max_inflight_samples: int = 512
    """Sample requests in flight over all tenants before new ones get HTTP 429 (back-off)."""
    max_inflight_per_tenant: int = 1024
    """Calls of one tenant handed to the trainer or samplers and not finished, at most. Past it
    a training call is accepted but waits in the server, in order; a sample gets HTTP 429,
    which the SDK retries (rl/server/limits.py). 0 = no cap."""
    max_models_per_tenant: int = 64
    """Models (training clients) one tenant may have alive at once; creating one more is refused
    (HTTP 400) until one is released: its session closed, or unload_model. 0 = no cap."""
    metrics_key_required: bool = False
    """GET /metrics answers only with a valid API key (X-API-Key, or Authorization: Bearer). Off
    by default, for a scraper on this machine; /metrics shows every tenant's name and counts."""
    max_chunk_datums: int = 1024
    """Datums per forward_backward request the SDK sends; larger batches come as chunks."""
    long_poll_s: float = 20.0
    """How long retrieve_future holds a pending request before answering try_again."""
    session_timeout_s: float = 3600.0
    """A session whose heartbeats (every 10 s from the SDK) stop for this long is ended: its
    models and samplers are released (their checkpoints stay). An hour outlasts a network blip
    and a laptop closed for a meeting (rl/server/lifecycle.py)."""
    door_idle_s: float = 600.0
    """A checkpoint that only the OpenAI and Anthropic doors sample leaves the samplers (its
    adapter slot freed) after this long without a request; the next request loads it again
    (rl/server/door_cache.py)."""
    max_checkpoint_gib_per_tenant: float = 0.0
    """Checkpoint storage per tenant, GiB, counted from the files of its listed checkpoints; a
    save that would go over it is refused with an error naming the cap and the tenant's use
    (deleting checkpoints or letting their TTL run out frees room). 0 = no cap."""
    sequence_record_ttl_s: float = 86400.0
    """How long a sampled sequence's record (sampling with record_stability_info=True, for
    stable_reinforce) lives after its last use: sampling it, or a training request naming it.
    A day, the SDK's promise ("can be trained on for one day after sampling")."""
    max_sequence_record_mib_per_tenant: float = 256.0
    """Memory for one tenant's sequence records, MiB (about 8 bytes a sampled token, plus 4 a
    prompt token per request); past it the least recently used records go first, and a span
    naming one is an error that says so."""
    verbose: bool = False
    """Log every request, and show Ray's, vLLM's and transformers' logs on the console."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The trainers' settings, one trainer per base model; --trainer.checkpoint_dir '' =
    <home>/checkpoints."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """The samplers' settings; --sampler.max_model_len is the longest sequence (prompt +
    reply) they accept, advertised to clients."""

    # Flags this config had before the actors' settings became sub-configs.
    RENAMED: ClassVar[dict[str, str]] = {
        "checkpoint_dir": "trainer.checkpoint_dir",
        "trainer_threads": "trainer.num_threads",
        "trainer_world_size": "trainer.world_size",
        "trainer_dtype": "trainer.dtype",
        "trainer_num_gpus": "trainer.num_gpus",
        "trainer_resources": "trainer.resources",
        "trainer_placement_strategy": "trainer.placement_strategy",
        "gradient_checkpointing": "trainer.gradient_checkpointing",
        "max_context_length": "sampler.max_model_len",
        "sampler_engine": "sampler.engine",
        "sampler_num_gpus": "sampler.num_gpus_per_actor",
        "sampler_resources": "sampler.resources_per_actor",
        "gpu_memory_utilization": "sampler.gpu_memory_utilization",
        "tensor_parallel_size": "sampler.tensor_parallel_size",
        "sampler_threads": "sampler.num_threads",
        "sampler_dtype": "sampler.dtype",
        "sync_mode": "sampler.sync_mode",
        "max_lora_rank": "sampler.max_lora_rank",
        "enforce_eager": "sampler.enforce_eager",
    }

    def __post_init__(self) -> None:
        if not self.max_checkpoint_gib_per_tenant >= 0:
            raise InvalidRequestError(
                f"--max_checkpoint_gib_per_tenant={self.max_checkpoint_gib_per_tenant} must be "
                ">= 0 (0 = no cap)"
            )
        if not self.sequence_record_ttl_s > 0:
            raise InvalidRequestError(
                f"--sequence_record_ttl_s={self.sequence_record_ttl_s} must be > 0"
            )
        if not self.max_sequence_record_mib_per_tenant > 0:
            raise InvalidRequestError(
                "--max_sequence_record_mib_per_tenant="
                f"{self.max_sequence_record_mib_per_tenant} must be > 0"
            )
        if not self.door_idle_s > 0:
            raise InvalidRequestError(f"--door_idle_s={self.door_idle_s} must be > 0")
        if not self.session_timeout_s > 0:
            raise InvalidRequestError(f"--session_timeout_s={self.session_timeout_s} must be > 0")
        for cap in ("max_inflight_per_tenant", "max_models_per_tenant"):
            if (value := getattr(self, cap)) < 0:
                raise InvalidRequestError(f"--{cap}={value} must be >= 0 (0 = no cap)")
        if self.sampler.max_model_len is None:
            raise InvalidRequestError(
                "--sampler.max_model_len must be a number for the server: it advertises it"
            )

    @property
    def max_context_length(self) -> int:
        """The longest sequence the samplers accept, as clients are told."""
        assert self.sampler.max_model_len is not None
        return self.sampler.max_model_len

    def resolved_home(self) -> Path:
        return Path(self.home).expanduser() if self.home else cache_dir() / "server"

    def resolved_keys_file(self) -> Path:
        if self.keys_file:
            return Path(self.keys_file).expanduser()
        return self.resolved_home() / "keys.json"

    def trainer_config(self) -> TrainerConfig:
        """The trainers' config as the server uses it: saving under <home> unless told."""
        if self.trainer.checkpoint_dir:
            return self.trainer
        checkpoints = str(self.resolved_home() / "checkpoints")
        return dataclasses.replace(self.trainer, checkpoint_dir=checkpoints)

    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]
