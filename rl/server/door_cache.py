"""The sampling clients of the OpenAI and Anthropic doors: one per (tenant, model), made by the
first request that needs it (later ones wait for that one), and let go when idle.

A door request holds no session, so nothing else would ever free a checkpoint's adapter that
only the doors sample: a client unused for `idle_s` (or pushed out of the cache by newer ones)
is dropped, and its checkpoint leaves the samplers unless another cached client or a Tinker
sampling session still samples it (`in_use`). The next request loads it again. A checkpoint
client whose weights the samplers let go meanwhile (the last Tinker session of it ended) is
made again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rl.client.sampling import SamplingClient
from rl.client.service import ServiceClient

CACHED_SAMPLERS = 256  # sampling clients kept, least recently used dropped first


@dataclass(frozen=True)
class Target:
    """The weights a request samples."""

    name: str  # the base model, or the tinker:// path
    base_model: str
    local: str | None = None  # the checkpoint's directory, for a tinker:// path


@dataclass
class _Entry:
    target: Target
    made: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    last_used: float = field(default_factory=time.time)


class SamplerCache:
    def __init__(
        self,
        service: ServiceClient,
        idle_s: float,
        in_use: Callable[[str], bool],
        size: int = CACHED_SAMPLERS,
    ):
        self._service = service
        self._idle_s = idle_s
        self._in_use = in_use  # a Tinker sampling session samples this checkpoint directory
        self._size = size
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[str, str], _Entry] = collections.OrderedDict()

    def client(self, tenant: str, target: Target) -> SamplingClient:
        """Blocking: making a client may start a sampler pool or load a checkpoint."""
        key = (tenant, target.name)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.made.done() and not _usable(entry.made):
                entry = None
            first = entry is None
            if entry is None:
                entry = self._entries[key] = _Entry(target)
            entry.last_used = time.time()
            self._entries.move_to_end(key)
            pushed_out = []
            while len(self._entries) > self._size:
                pushed_out.append(self._entries.popitem(last=False)[1])
        self._release(pushed_out)
        if first:
            try:
                entry.made.set_result(self._make(target))
            except BaseException as error:
                with self._lock:
                    if self._entries.get(key) is entry:
                        del self._entries[key]
                entry.made.set_exception(error)
        client: SamplingClient = entry.made.result()
        return client

    def holds(self, local: str) -> bool:
        """Whether a cached client samples the checkpoint at `local`."""
        with self._lock:
            return any(e.target.local == local for e in self._entries.values())

    def release_idle(self, now: float) -> int:
        """Drops the clients unused for `idle_s` before `now` and frees their checkpoints'
        weights on the samplers where nothing else samples them; how many were dropped."""
        with self._lock:
            idle = [k for k, e in self._entries.items() if now - e.last_used > self._idle_s]
            dropped = [self._entries.pop(k) for k in idle]
        self._release(dropped)
        return len(dropped)

    def _release(self, dropped: list[_Entry]) -> None:
        for local in {e.target.local for e in dropped if e.target.local is not None}:
            if not self.holds(local) and not self._in_use(local):
                self._service.pools.release_checkpoint(local)

    def _make(self, target: Target) -> SamplingClient:
        if target.local is None:
            return self._service.create_sampling_client(base_model=target.base_model)
        return self._service.create_sampling_client(
            model_path=target.local, base_model=target.base_model
        )


def _usable(made: concurrent.futures.Future) -> bool:
    if made.exception() is not None:
        return False
    client: SamplingClient = made.result()
    if client.weights.kind == "base":
        return True
    return client.weights in client.pool.path_versions.values()


__all__ = ["CACHED_SAMPLERS", "SamplerCache", "Target"]
