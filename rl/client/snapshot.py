"""Keeping a merged-mode sampling client on its own weights after a later sync.

In Tinker a sampling client is a snapshot: it samples the weights it was created from for as
long as it lives. A merged-mode pool holds one set of full weights per training client, so a
later sync replaces what an older client was made from. Such a client therefore also keeps
the LoRA adapter of its weights (an ObjectRef exported by the trainer at sync time, about
4 bytes x rank x (in + out) per adapted matrix), and once its merged weights are gone it
samples that adapter on the base model's LoRA pool (started on first need). The two paths
compute the same function; they differ by float rounding only (merged W + BA vs W x + B(Ax)).

The adapter stays loadable for as long as the client lives: if the LoRA pool dropped its
version (it keeps `max_versions_per_model` per training client), it is pushed again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from rl.errors import InvalidRequestError
from rl.types import SampleResponse
from samplers.pool import SamplerPool
from samplers.types import SampleRequest, WeightsSupersededError, WeightsVersion

if TYPE_CHECKING:
    from rl.client.service import ServiceClient


class Snapshot:
    """The adapter behind a merged-mode sampling client, served when the merge is gone."""

    def __init__(self, service: ServiceClient, model_id: str, rank: int, source: Any):
        self.service = service
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
        from rl.client.sampling import shared_pool

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one push, however many requests wait for it
            # Starting the pool blocks (engine start-up): off the loop the pools run on.
            lora_pool = await asyncio.to_thread(shared_pool, self.service, model_dir)
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
