"""The sampler pools of one service, and the adapter kept behind a merged-mode sampling client.

A service has, per base model, one pool without LoRA (base-model sampling clients: requests
batch freely), one with LoRA (saved sampler checkpoints and adapter-mode weight syncs, many
adapters per engine), and per training client in merged mode a pool of its own, because a
merged engine holds one set of full weights. Each pool starts on first use; `SamplerPools`
keeps them, so every client of the service shares them.

A sampling client is a snapshot, as in Tinker: it samples the weights it was made from for as
long as it lives. A merged pool holds one set of full weights per training client, so a later
sync replaces what an older client was made from. Such a client therefore also keeps the LoRA
adapter of its weights (`AdapterBackup`: an ObjectRef exported by the trainer at sync time,
about 4 bytes x rank x (in + out) per adapted matrix), and once its merged weights are gone it
samples that adapter on the LoRA pool. The two paths compute the same function; they differ
by float rounding only (merged W + BA vs W x + B(Ax)). If the LoRA pool dropped the backup's
version (it keeps `max_versions_per_model` per training client), it is pushed again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from typing import Any

import ray

from rl.errors import InvalidRequestError
from rl.types import SampleResponse
from samplers.config import SamplerConfig, resolve_sync_mode
from samplers.engine_choice import engine_config_for
from samplers.pool import SamplerPool, submit
from samplers.types import SampleRequest, WeightsSupersededError, WeightsVersion


class SamplerPools:
    """The pools of one service, keyed by what they serve, each started on first use."""

    def __init__(self, config: SamplerConfig | None = None):
        self.config = config or SamplerConfig()
        self._pools: dict[str, SamplerPool] = {}
        self._starting: dict[str, concurrent.futures.Future[SamplerPool]] = {}
        self._lock = threading.Lock()

    def base(self, model_dir: str) -> SamplerPool:
        """Base-model sampling: no LoRA, so requests batch freely (see engine_vllm)."""
        return self._get(model_dir, f"{model_dir}::base", enable_lora=False)

    def lora(self, model_dir: str) -> SamplerPool:
        """Saved sampler checkpoints and adapter-mode syncs of `model_dir`."""
        return self._get(model_dir, f"{model_dir}::lora", enable_lora=True)

    def merged(self, model_dir: str, model_id: str) -> SamplerPool:
        """The merged weights of one training client."""
        return self._get(model_dir, f"{model_dir}::merged::{model_id}", enable_lora=False)

    def for_sync(
        self, model_dir: str, model_id: str, sync_mode: str | None
    ) -> tuple[str, SamplerPool]:
        """(mode, pool) of a weight sync of training client `model_id`: the LoRA pool in
        adapter mode, the client's own pool in merged mode."""
        on_gpu = ray.cluster_resources().get("GPU", 0) > 0
        mode = sync_mode or resolve_sync_mode(self.config, on_gpu)
        if mode == "adapter":
            return mode, self.lora(model_dir)
        return mode, self.merged(model_dir, model_id)

    def started(self) -> dict[str, SamplerPool]:
        """The pools started so far, by key."""
        with self._lock:
            return dict(self._pools)

    def release_model(self, model_id: str) -> None:
        """Frees what training client `model_id` holds on the samplers: its merged pool
        (a whole engine) and its adapter versions on the LoRA pools."""
        for key, pool in self.started().items():
            if key.endswith(f"::merged::{model_id}"):
                self.drop(pool)
            elif pool.enable_lora and pool.versions_of(model_id):
                submit(pool.forget(pool.versions_of(model_id))).result()

    def release_checkpoint(self, path: str) -> None:
        """Frees the adapter version loaded for the sampler checkpoint at `path`."""
        for pool in self.started().values():
            weights = pool.path_versions.get(path)
            if weights is not None:
                submit(pool.forget([weights])).result()

    def drop(self, pool: SamplerPool) -> None:
        """Closes `pool` and forgets it (a later request starts a new one)."""
        with self._lock:
            self._pools = {key: p for key, p in self._pools.items() if p is not pool}
        pool.close()

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def _get(self, model_dir: str, key: str, *, enable_lora: bool) -> SamplerPool:
        """The pool `key`, started by the first caller; the others wait for that start. The
        lock is not held while a pool starts (its reservation may wait a minute for a CPU),
        so releasing other pools, which frees CPUs, is not held up by it."""
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                return pool
            starting = self._starting.get(key)
            first = starting is None
            if starting is None:
                starting = self._starting[key] = concurrent.futures.Future()
        if not first:
            return starting.result()
        try:
            gpus = self.config.resolved_gpus(ray.cluster_resources().get("GPU", 0))
            # vLLM or torch for this model, decided before any actor starts.
            config = engine_config_for(model_dir, self.config, gpus > 0)
            pool = SamplerPool(model_dir, config, enable_lora=enable_lora, label=key)
            pool.start()
        except BaseException as error:
            with self._lock:
                del self._starting[key]
            starting.set_exception(error)
            raise
        with self._lock:
            self._pools[key] = pool
            del self._starting[key]
        starting.set_result(pool)
        return pool


class AdapterBackup:
    """The adapter behind a merged-mode sampling client, served once its merge is gone."""

    def __init__(self, pools: SamplerPools, model_id: str, rank: int, source: Any):
        self.pools = pools
        self.model_id = model_id
        self.rank = rank
        self.source = source  # ObjectRef of (adapter_config, tensors)
        self.weights: WeightsVersion | None = None  # its version on the LoRA pool, once pushed
        self._lock: asyncio.Lock | None = None  # made on the pools' loop, on first need

    async def sample(self, pool: SamplerPool, request: SampleRequest) -> SampleResponse:
        """`request` on the merged weights while the pool holds them, else on the adapter."""
        try:
            return await pool.sample(request)
        except WeightsSupersededError:
            pass
        lora_pool, weights = await self._on_lora_pool(pool.model_dir)
        return await lora_pool.sample(dataclasses.replace(request, weights=weights))

    async def _on_lora_pool(self, model_dir: str) -> tuple[SamplerPool, WeightsVersion]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one push, however many requests wait for it
            # Starting the pool blocks (engine start-up): off the loop the pools run on.
            lora_pool = await asyncio.to_thread(self.pools.lora, model_dir)
            assert lora_pool.info is not None
            if self.rank > lora_pool.info.max_lora_rank:
                raise InvalidRequestError(
                    f"this sampling client's weights were replaced by a later merged sync, and "
                    f"its LoRA rank {self.rank} is above the sampler's max_lora_rank "
                    f"{lora_pool.info.max_lora_rank} (raise SamplerConfig.max_lora_rank)"
                )
            if self.weights is None or not lora_pool.is_registered(self.weights):
                weights = lora_pool.new_version("adapter", f"{self.model_id}#snapshots")
                await lora_pool.push(weights, self.source)
                self.weights = weights
            return lora_pool, self.weights


__all__ = ["AdapterBackup", "SamplerPools"]
