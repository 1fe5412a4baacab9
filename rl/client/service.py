"""`ServiceClient`: the entry point. Connects to Ray and hands out training/sampling clients.

Ray: an already-initialised Ray in this process, else an explicit `address`, else
`RAY_ADDRESS`, else an embedded local Ray started here (and shut down by `close()`).

The service owns what its clients share, and hands them that, never itself: one trainer host
per base model (rl/client/trainer_host.py: its actor holds every adapter created for that model
through this service, and is restarted with its clients restored if it dies), and the sampler
pools (rl/client/pools.py). `make_service` builds one from an entry point's configs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import ray

from rl.checkpoint_format import read_checkpoint
from rl.client.pools import SamplerPools
from rl.client.sampling import SamplingClient, create_sampling_client
from rl.client.trainer_host import TrainerHost
from rl.client.training import TrainingClient
from rl.errors import InvalidRequestError
from rl.futures import APIFuture, ray_get
from rl.types import LoraConfig
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig


class ServiceClient:
    def __init__(
        self,
        address: str | None = None,
        *,
        trainer_config: TrainerConfig | None = None,
        sampler_config: SamplerConfig | None = None,
        num_cpus: int | None = None,
        namespace: str = "engineroom",
        **ray_init_kwargs: object,
    ):
        self.trainer_config = trainer_config or TrainerConfig()
        self.namespace = namespace
        self.checkpoint_dir: Path = self.trainer_config.resolved_checkpoint_dir()
        self.session_id = uuid.uuid4().hex[:12]
        self._owns_ray = _connect_ray(address, num_cpus, namespace, dict(ray_init_kwargs))
        self.hosts: dict[str, TrainerHost] = {}  # one per base model, started on first use
        self.pools = SamplerPools(sampler_config)
        self._model_seq = itertools.count()
        self._lock = threading.Lock()
        self._training_clients: list[TrainingClient] = []

    # -- training clients --------------------------------------------------------------------

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        *,
        model_id: str | None = None,
    ) -> TrainingClient:
        """A new LoRA adapter on `base_model`, with its own optimizer and ordered queue.

        `model_id`: the id to give it (the HTTP server passes the one Tinker clients derive);
        by default `<session>:train:<n>`."""
        lora_config = LoraConfig(
            rank=rank,
            seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
        )
        host = self._host_for(base_model)
        model_id = model_id or self._next_model_id()
        info = ray_get(host.handle.create_adapter.remote(model_id, lora_config))
        return self._register(host, TrainingClient(host, self.pools, model_id, info))

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        *,
        model_id: str | None = None,
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self.create_lora_training_client,
            base_model,
            rank,
            seed,
            train_mlp,
            train_attn,
            train_unembed,
            user_metadata,
            model_id=model_id,
        )

    def create_training_client_from_state(
        self, path: str, base_model: str | None = None, *, model_id: str | None = None
    ) -> TrainingClient:
        """A new training client holding the weights saved at `path`, with a fresh optimizer."""
        return self._from_state(path, base_model, with_optimizer=False, model_id=model_id)

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None, *, model_id: str | None = None
    ) -> TrainingClient:
        """A new training client resuming exactly: weights, Adam moments and step count."""
        return self._from_state(path, base_model, with_optimizer=True, model_id=model_id)

    async def create_training_client_from_state_async(
        self, path: str, base_model: str | None = None, *, model_id: str | None = None
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self.create_training_client_from_state, path, base_model, model_id=model_id
        )

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str, base_model: str | None = None, *, model_id: str | None = None
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self.create_training_client_from_state_with_optimizer,
            path,
            base_model,
            model_id=model_id,
        )

    # -- sampling clients ----------------------------------------------------------------------

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: object = None,
    ) -> SamplingClient:
        """A client for `base_model`, or for the sampler checkpoint at `model_path` (the path
        `save_weights_for_sampler` returned). `retry_config` is accepted for Tinker
        compatibility; the sampler pool retries by itself."""
        return create_sampling_client(self.pools, model_path=model_path, base_model=base_model)

    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: object = None,
    ) -> SamplingClient:
        return await asyncio.to_thread(
            self.create_sampling_client, model_path, base_model, retry_config
        )

    # -- lifecycle -------------------------------------------------------------------------

    def release(self, client: TrainingClient, why: str = "released by its owner") -> None:
        """Frees everything `client` holds: its adapter, optimizer state and gradients on the
        trainer, its weights on the samplers, its queue. Its checkpoints stay. Later calls of
        it raise NotFoundError saying `why`; sampling clients made from it stop working."""
        client.mark_released(why)
        client.close()
        with self._lock:
            if client in self._training_clients:
                self._training_clients.remove(client)
        host = self.hosts.get(client.base_model)
        if host is not None:
            host.release(client, client.model_id)
        self.pools.release_model(client.model_id)

    def close(self) -> None:
        """Stops this client's actors, and the embedded Ray if this client started it."""
        for client in self._training_clients:
            client.close()
        for host in self.hosts.values():
            host.close()  # its actors and their reservations
        self.hosts.clear()
        self.pools.close()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _host_for(self, base_model: str) -> TrainerHost:
        if not isinstance(base_model, str) or not base_model:
            raise InvalidRequestError(f"base_model must be a non-empty string, got {base_model!r}")
        with self._lock:
            if base_model not in self.hosts:
                self.hosts[base_model] = TrainerHost(base_model, self.trainer_config)
            return self.hosts[base_model]

    def _next_model_id(self) -> str:
        # The format Tinker clients derive themselves: "<session>:train:<seq>".
        return f"{self.session_id}:train:{next(self._model_seq)}"

    def _from_state(
        self, path: str, base_model: str | None, with_optimizer: bool, model_id: str | None = None
    ) -> TrainingClient:
        meta = read_checkpoint(path, with_optimizer=False).meta
        host = self._host_for(base_model or meta.base_model)
        model_id = model_id or self._next_model_id()
        info = ray_get(
            host.handle.create_adapter_from_state.remote(model_id, str(path), with_optimizer)
        )
        restore_point = ("state", str(path), with_optimizer)
        client = TrainingClient(host, self.pools, model_id, info, restore_point=restore_point)
        return self._register(host, client)

    def _register(self, host: TrainerHost, client: TrainingClient) -> TrainingClient:
        self._training_clients.append(client)
        host.clients.append(client)  # restored with the others if the trainer dies
        return client


def _connect_ray(
    address: str | None, num_cpus: int | None, namespace: str, kwargs: dict[str, Any]
) -> bool:
    """Connects to Ray; returns True when this call started an embedded local instance."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=namespace, **kwargs)
        return False
    # "local" always starts a fresh embedded instance, never a stray cluster on this host.
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("log_to_driver", True)
    # Ray starts idle Python workers when it starts and when the first driver connects.
    # Ours are never used (every actor here carries a runtime_env, which needs a worker of
    # its own), and on a small machine starting them delays the actors that are: without
    # them the first sample comes about 0.9 s sooner.
    kwargs["_system_config"] = {
        "enable_worker_prestart": False,
        "prestart_worker_first_driver": False,
        **kwargs.get("_system_config", {}),
    }
    ray.init(address="local", num_cpus=num_cpus, namespace=namespace, **kwargs)
    return True


def make_service(
    trainer: TrainerConfig, sampler: SamplerConfig | None = None, *, verbose: bool = False
) -> ServiceClient:
    """The service an entry point (rl.loop.train, rl.loop.sft, rl.server) runs on: Ray from
    RAY_ADDRESS, else embedded. The actors' output (vLLM's config dumps, per-sync warnings)
    stays in Ray's log files unless `verbose`."""
    return ServiceClient(trainer_config=trainer, sampler_config=sampler, log_to_driver=verbose)


__all__ = ["APIFuture", "ServiceClient", "make_service"]
