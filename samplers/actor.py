"""The sampler Ray actor: one engine, the weights it holds, and nothing else.

It is an async actor, so hundreds of `sample` calls are in flight at once and the engine
batches them. It keeps track of which adapter versions it holds and how many requests use
each: a version superseded by a newer sync of the same training client is unloaded only when
its last request finishes. A request for weights it does not hold (it was restarted, or the
version was unloaded) raises `WeightsNotLoadedError`; the pool then pushes them and retries.
Merged weights are replaced only once the requests on them have finished, and from the moment
a replacement begins, a request for the older weights raises `WeightsSupersededError`: no
request is ever answered by weights other than those it asked for (the torch engine would
otherwise run queued requests on the new weights).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rl.errors import WeightSyncError
from rl.types import SampleResponse
from samplers.config import SamplerConfig
from samplers.engine import make_engine
from samplers.merge import BaseWeights, merged_weights
from samplers.types import (
    BASE,
    EngineInfo,
    SampleRequest,
    WeightsNotLoadedError,
    WeightsSupersededError,
    WeightsVersion,
)

_DIR_PREFIX = "engineroom-adapters-"


@dataclass
class _Adapter:
    weights: WeightsVersion
    path: str
    owned: bool  # files written by this actor (deleted on unload), not a user checkpoint
    inflight: int = 0
    retired: bool = False


class SamplerActor:
    def __init__(self, model_dir: str, config: SamplerConfig, enable_lora: bool):
        self.incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._engine = make_engine(model_dir, config, enable_lora=enable_lora, in_actor=True)
        self._can_sleep = config.sleep_between_rollouts
        self._dir = _adapter_dir()
        self._adapters: dict[int, _Adapter] = {}
        self._merged: WeightsVersion = BASE
        self._merged_next: WeightsVersion | None = None  # a replacement under way
        self._merged_users = 0  # requests running on the merged weights
        self._merged_idle = asyncio.Event()
        self._served = 0
        self._deferred_unloads = 0  # versions retired while requests still used them
        self._base_weights: BaseWeights | None = None  # for merges on this side (merge.py)

    def ready(self) -> tuple[str, EngineInfo]:
        """(incarnation, engine info); raises `EngineFailedError` once the engine broke."""
        check_alive = getattr(self._engine, "check_alive", None)
        if check_alive is not None:
            check_alive()
        return self.incarnation, self._engine.info

    async def sample(self, request: SampleRequest) -> SampleResponse:
        adapter = self._holding(request.weights)
        merged = request.weights.kind == "merged"
        if adapter is not None:
            adapter.inflight += 1
        if merged:
            self._merged_users += 1
            self._merged_idle.clear()
        try:
            response = await self._engine.sample(request, adapter.path if adapter else None)
            self._served += 1
            return response
        finally:
            if merged:
                self._merged_users -= 1
                if self._merged_users == 0:
                    self._merged_idle.set()
            if adapter is not None:
                adapter.inflight -= 1
                if adapter.retired and adapter.inflight == 0:
                    await self._unload(adapter)

    def _holding(self, weights: WeightsVersion) -> _Adapter | None:
        """The adapter serving `weights` (None for base/merged); raises if not held."""
        if weights.kind == "adapter":
            adapter = self._adapters.get(weights.version)
            if adapter is None:
                raise WeightsNotLoadedError(weights, self.incarnation)
            return adapter
        if weights.kind == "merged":
            if self._merged.model_id != weights.model_id or self._merged.version < weights.version:
                raise WeightsNotLoadedError(weights, self.incarnation)
            newest = self._merged_next or self._merged
            if newest.version > weights.version:
                raise WeightsSupersededError(weights, f"sampler actor {self.incarnation}")
        return None

    async def load_adapter(self, weights: WeightsVersion, source: Any) -> dict[str, float]:
        """Registers an adapter: `source` is a PEFT directory or (adapter_config, tensors).

        Older versions of the same training client are retired: unloaded once idle.
        """
        start = time.perf_counter()
        if weights.version in self._adapters:
            return {"load_s": 0.0}
        if isinstance(source, str):
            path, owned = source, False
        else:
            adapter_config, tensors = source
            path = str(self._dir / f"v{weights.version}")
            # Imported here: `trainers` pulls in peft, which only adapter pushes need.
            from rl.checkpoint_format import write_peft_files

            await asyncio.to_thread(write_peft_files, Path(path), adapter_config, tensors)
            owned = True
        written = time.perf_counter()
        await asyncio.to_thread(self._engine.load_adapter, weights.version, path)
        self._adapters[weights.version] = _Adapter(weights, path, owned)
        for other in list(self._adapters.values()):
            if (
                other.weights.model_id == weights.model_id
                and other.weights.version < weights.version
            ):
                other.retired = True
                if other.inflight == 0:
                    await self._unload(other)
                else:
                    self._deferred_unloads += 1
        # Cache keys include the adapter name, so no stale hit is possible; the reset only
        # frees blocks, and vLLM refuses it while requests hold blocks (harmless then).
        await asyncio.to_thread(self._engine.reset_prefix_cache)
        return {"write_s": written - start, "load_s": time.perf_counter() - written}

    async def retire(self, versions: list[int]) -> int:
        """Unloads these adapter versions (each once its running requests finish), and gives
        the freed memory back to the OS; returns how many were held."""
        held = [self._adapters[v] for v in versions if v in self._adapters]
        for adapter in held:
            adapter.retired = True
            if adapter.inflight == 0:
                await self._unload(adapter)
            else:
                self._deferred_unloads += 1
        _release_freed_memory()
        return len(held)

    async def _unload(self, adapter: _Adapter) -> None:
        if self._adapters.pop(adapter.weights.version, None) is None:
            return
        await asyncio.to_thread(self._engine.unload_adapter, adapter.weights.version)
        if adapter.owned:
            shutil.rmtree(adapter.path, ignore_errors=True)

    async def load_merged(self, weights: WeightsVersion, state_dict: Any) -> dict[str, float]:
        """Loads full weights (a state dict, or (adapter_config, adapter tensors) to merge
        here) once the requests running on the old ones have finished."""
        start = time.perf_counter()
        if self._merged.model_id == weights.model_id and self._merged.version >= weights.version:
            return {"load_s": 0.0}
        timings: dict[str, float] = {}
        if isinstance(state_dict, tuple):  # (adapter_config, adapter weights): merged here
            if self._merged == BASE and _no_delta(state_dict[1]):
                # A fresh adapter (every LoRA B zero) merges into exactly the base weights
                # that this engine holds: nothing to reload (the sync's check still runs).
                self._merged = weights
                return {"load_s": time.perf_counter() - start}
            # Merged on the engine's thread, once the old weights' requests are done.
            adapter_config, adapter = state_dict
            state_dict = functools.partial(self._merge_here, adapter_config, adapter, timings)
        self._merged_next = weights  # from now on, new requests for the old ones are refused
        try:
            while self._merged_users:
                await self._merged_idle.wait()
            await asyncio.to_thread(self._engine.load_full_weights, state_dict)
            self._merged = weights
        finally:
            self._merged_next = None
        del state_dict
        _release_freed_memory()
        return {**timings, "load_s": time.perf_counter() - start}

    def _merge_here(
        self,
        adapter_config: dict[str, Any],
        adapter: Mapping[str, torch.Tensor],
        timings: dict[str, float],
    ) -> dict[str, torch.Tensor]:
        """The adapter merged into this actor's copy of the base weights (samplers.merge);
        its time goes in `timings["merge_s"]`."""
        began = time.perf_counter()
        if self._base_weights is None:
            self._base_weights = BaseWeights(self._engine.info.model_dir)
        dtype = getattr(torch, self._engine.info.dtype)
        merged = merged_weights(self._base_weights, adapter_config, adapter, dtype)
        if merged is None:
            raise WeightSyncError(
                "this adapter cannot be merged on the sampler (embedding or DoRA adapter, or "
                "weights missing from the checkpoint's safetensors); sync it with full weights"
            )
        timings["merge_s"] = time.perf_counter() - began
        return merged

    async def sleep(self) -> bool:
        """Frees the engine's GPU memory until its next request or weight load, which wake
        it (vLLM sleep mode, `SamplerConfig.sleep_between_rollouts`); False: not enabled."""
        sleep = getattr(self._engine, "sleep", None)  # the torch engine has none
        if not self._can_sleep or sleep is None:
            return False
        await asyncio.to_thread(sleep)
        return True

    def held(self) -> dict[str, Any]:
        """What this actor holds now (for tests and debugging)."""
        return {
            "incarnation": self.incarnation,
            "served": self._served,
            "deferred_unloads": self._deferred_unloads,
            "adapters": {
                v: (a.weights.model_id, a.inflight, a.retired) for v, a in self._adapters.items()
            },
            "merged": self._merged,
        }


def _adapter_dir() -> Path:
    """A fresh directory for this actor's adapter files, in memory where possible.

    Directories left by dead actors (their pid is gone) are removed first.
    """
    root = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    for old in root.glob(f"{_DIR_PREFIX}*"):
        pid = old.name.removeprefix(_DIR_PREFIX).split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=root))


def _release_freed_memory() -> None:
    """Hands freed heap pages back to the OS (glibc keeps them after a full-weight reload)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SERIAL_NUMEL = 32768  # torch's grain: smaller reductions run on the calling thread alone


def _no_delta(adapter: Mapping[str, torch.Tensor]) -> bool:
    """True if the adapter changes no weight: every LoRA B (up-projection) is zero."""
    ups = [t for name, t in adapter.items() if "lora_B" in name]
    # In pieces of at most _SERIAL_NUMEL: a larger reduction starts an OpenMP team on this
    # (the actor's) thread, and a second team in the process left every later engine step
    # 10-20% slower.
    return bool(ups) and all(
        not piece.any() for t in ups for piece in t.reshape(-1).split(_SERIAL_NUMEL)
    )
