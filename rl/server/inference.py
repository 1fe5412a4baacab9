"""What the OpenAI and Anthropic doors sample with: the weights a request's `model` names,
one cached `SamplingClient` per tenant and model, and sample calls counted like `asample`'s
(the server's sampling queue, the tenant's in-flight cap, `/metrics`).

A request's `model` is a base model this server serves, a `tinker://` sampler path of the
caller's own (resolved through the caller's run records, so another tenant's answers 404 like
one that does not exist), or `<base model>;<tinker:// path>` (Tinker's spelling; the base
must be the one the checkpoint was trained on).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any

from rl.client.sampling import SamplingClient
from rl.errors import InvalidRequestError, NotFoundError
from rl.server.limits import LimitError
from rl.server.state import ServerState
from rl.server.store import tinker_path
from rl.types import ModelInput, SampleResponse, SamplingParams

CACHED_SAMPLERS = 256  # sampling clients kept, least recently used dropped first


@dataclass(frozen=True)
class Target:
    """The weights a request samples."""

    name: str  # the base model, or the tinker:// path
    base_model: str
    local: str | None = None  # the checkpoint's directory, for a tinker:// path


def target(state: ServerState, tenant: str, model: str) -> Target:
    """The weights `model` names for `tenant`; NotFoundError for a model not served here or a
    path that is not the tenant's own."""
    base, _, path = model.rpartition(";") if ";" in model else ("", "", model)
    if path.startswith("tinker://"):
        resolved = state.runs.resolve(tenant, path)
        trained_on = resolved.run.base_model
        if base and base != trained_on:
            raise InvalidRequestError(
                f"model {model!r}: the checkpoint was trained on {trained_on!r}, not {base!r}"
            )
        return Target(path, state.base_model(trained_on), str(resolved.local))
    try:
        return Target(model, state.base_model(model))
    except InvalidRequestError as error:
        raise NotFoundError(str(error)) from None


def model_names(state: ServerState, tenant: str) -> list[tuple[str, int]]:
    """(model id, created) of what `tenant` can sample: the base models, then its sampler
    checkpoints."""
    names = [(name, 0) for name in state.config.model_names()]
    for run in state.runs.owned(tenant):
        for checkpoint_id, entry in state.runs.checkpoints(run):
            kind, name = checkpoint_id.split("/", 1)
            if kind == "sampler_weights":
                names.append((tinker_path(run.run_id, kind, name), int(entry.created)))
    return names


class SamplerCache:
    """One `SamplingClient` per (tenant, model), made by the first request that needs it;
    later ones wait for that one. A checkpoint client whose weights the samplers have since
    let go (the last Tinker sampling session of that checkpoint ended) is made again."""

    def __init__(self, state: ServerState, size: int = CACHED_SAMPLERS):
        self._state = state
        self._size = size
        self._lock = threading.Lock()
        self._clients: collections.OrderedDict[tuple[str, str], concurrent.futures.Future] = (
            collections.OrderedDict()
        )

    def client(self, tenant: str, target: Target) -> SamplingClient:
        """Blocking: making a client may start a sampler pool or load a checkpoint."""
        key = (tenant, target.name)
        with self._lock:
            made = self._clients.get(key)
            if made is not None and made.done() and not _usable(made):
                made = None
            first = made is None
            if made is None:
                made = self._clients[key] = concurrent.futures.Future()
            self._clients.move_to_end(key)
            while len(self._clients) > self._size:
                self._clients.popitem(last=False)  # dropped here; the samplers keep it loaded
        if first:
            try:
                made.set_result(self._make(target))
            except BaseException as error:
                with self._lock:
                    if self._clients.get(key) is made:
                        del self._clients[key]
                made.set_exception(error)
        client: SamplingClient = made.result()
        return client

    def _make(self, target: Target) -> SamplingClient:
        service = self._state.service
        if target.local is None:
            return service.create_sampling_client(base_model=target.base_model)
        return service.create_sampling_client(model_path=target.local, base_model=target.base_model)


def _usable(made: concurrent.futures.Future) -> bool:
    if made.exception() is not None:
        return False
    client: SamplingClient = made.result()
    if client.weights.kind == "base":
        return True
    return client.weights in client.pool.path_versions.values()


async def sample(
    state: ServerState,
    tenant: str,
    client: SamplingClient,
    prompts: list[list[int]],
    num_samples: int,
    params: SamplingParams,
    topk_logprobs: int = 0,
) -> list[SampleResponse]:
    """One sample call per prompt, each counted as a `sample` call of `tenant` in flight and
    in `/metrics`; LimitError (429) when the server's or the tenant's queue is full."""
    _check_room(state, tenant)
    extra: dict[str, Any] = {"topk_sample_logprobs": topk_logprobs} if topk_logprobs else {}
    futures = []
    for prompt in prompts:
        state.metrics.calls.labels(tenant, "sample").inc()
        try:
            future = client.sample(
                ModelInput.from_ints(prompt), num_samples, params, owner=tenant, **extra
            ).future()
        except Exception as error:
            state.metrics.failed(tenant, "sample", error)
            raise
        state.limits.track(tenant, future)
        state.metrics.watch(tenant, "sample", future, None)
        futures.append(asyncio.wrap_future(future))
    return list(await asyncio.gather(*futures))


def _check_room(state: ServerState, tenant: str) -> None:
    if state.sampling_busy():
        state.metrics.limited(tenant, "sampling_queue")
        raise LimitError("the sampling queue is full; back off and retry", "sampling_queue")
    if not state.limits.has_room(tenant):
        state.metrics.limited(tenant, "inflight")
        cap = state.config.max_inflight_per_tenant
        raise LimitError(
            f"tenant {tenant!r} has {cap} calls in flight, this server's cap "
            "(--max_inflight_per_tenant); back off and retry",
            "inflight",
        )


__all__ = ["SamplerCache", "Target", "model_names", "sample", "target"]
