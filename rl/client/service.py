"""`ServiceClient`: the entry point. Connects to Ray and hands out training/sampling clients.

Ray: an explicit `address`, else `RAY_ADDRESS`, else an already-initialised Ray in this
process, else an embedded local Ray started here (and shut down by `close()`).
One trainer actor is started per base model and shared by every training client (adapter)
created for that model through this ServiceClient; if it dies, it is restarted and its
clients restored to their last saved state (rl/client/trainer_host.py).
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import ray

from rl.checkpoint_format import read_checkpoint
from rl.client.trainer_host import TrainerHost
from rl.client.training import TrainingClient
from rl.errors import InvalidRequestError
from rl.futures import APIFuture, ray_get
from rl.placement import Reservation
from rl.types import LoraConfig
from trainers.config import TrainerConfig


class ServiceClient:
    def __init__(
        self,
        address: str | None = None,
        *,
        trainer_config: TrainerConfig | None = None,
        sampler_config: Any = None,
        num_cpus: int | None = None,
        namespace: str = "engineroom",
        **ray_init_kwargs: Any,
    ):
        self.trainer_config = trainer_config or TrainerConfig()
        self.sampler_config = sampler_config
        self.namespace = namespace
        self.checkpoint_dir: Path = self.trainer_config.resolved_checkpoint_dir()
        self.session_id = uuid.uuid4().hex[:12]
        self._owns_ray = _connect_ray(address, num_cpus, namespace, ray_init_kwargs)
        self._trainers: dict[str, Any] = {}
        self._hosts: dict[str, TrainerHost] = {}
        self._reservations: list[Reservation] = []
        self._sampler_pools: dict[str, Any] = {}
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
        actor = self._trainer_for(base_model)
        model_id = model_id or self._next_model_id()
        info = ray_get(actor.create_adapter.remote(model_id, lora_config))
        return self._register(TrainingClient(self, actor, model_id, base_model, info))

    async def create_lora_training_client_async(self, *args: Any, **kwargs: Any) -> TrainingClient:
        return await _in_thread(self.create_lora_training_client, *args, **kwargs)

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

    # -- sampling clients (implemented in rl.client.sampling) ---------------------------------

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **kwargs: Any
    ) -> Any:
        from rl.client.sampling import create_sampling_client

        return create_sampling_client(self, model_path=model_path, base_model=base_model, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stops this client's actors, and the embedded Ray if this client started it."""
        for client in self._training_clients:
            client._queue.close()
        for host in self._hosts.values():
            host.close()
        self._hosts.clear()
        for pool in self._sampler_pools.values():
            close = getattr(pool, "close", None)
            if close is not None:
                close()
        for reservation in self._reservations:
            reservation.release()
        self._trainers.clear()
        self._sampler_pools.clear()
        self._reservations.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _trainer_for(self, base_model: str) -> Any:
        if not isinstance(base_model, str) or not base_model:
            raise InvalidRequestError(f"base_model must be a non-empty string, got {base_model!r}")
        with self._lock:
            if base_model not in self._hosts:
                host = TrainerHost(base_model, self.trainer_config)
                self._reservations.extend(host.reservations)
                self._hosts[base_model] = host
            self._trainers[base_model] = self._hosts[base_model].handle
            return self._trainers[base_model]

    def _next_model_id(self) -> str:
        # The format Tinker clients derive themselves: "<session>:train:<seq>".
        return f"{self.session_id}:train:{next(self._model_seq)}"

    def _from_state(
        self, path: str, base_model: str | None, with_optimizer: bool, model_id: str | None = None
    ) -> TrainingClient:
        meta = read_checkpoint(path, with_optimizer=False).meta
        actor = self._trainer_for(base_model or meta.base_model)
        model_id = model_id or self._next_model_id()
        info = ray_get(actor.create_adapter_from_state.remote(model_id, str(path), with_optimizer))
        restore_point = ("state", str(path), with_optimizer)
        return self._register(
            TrainingClient(
                self,
                actor,
                model_id,
                base_model or meta.base_model,
                info,
                restore_point=restore_point,
            )
        )

    def _register(self, client: TrainingClient) -> TrainingClient:
        self._training_clients.append(client)
        host = self._hosts.get(client.base_model)
        if host is not None:  # restored with the others if the trainer dies
            host.clients.append(client)
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
    # them the first sample came 0.9 s sooner (bench/README.md).
    kwargs["_system_config"] = {
        "enable_worker_prestart": False,
        "prestart_worker_first_driver": False,
        **kwargs.get("_system_config", {}),
    }
    ray.init(address="local", num_cpus=num_cpus, namespace=namespace, **kwargs)
    return True


async def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args, **kwargs)


__all__ = ["APIFuture", "ServiceClient"]
