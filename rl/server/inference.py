"""What the OpenAI and Anthropic doors sample with: the weights a request's `model` names, and
sample calls counted like `asample`'s (the server's sampling queue, the tenant's in-flight
cap, `/metrics`). The clients themselves are cached in rl/server/door_cache.py.

A request's `model` is a base model this server serves, a `tinker://` sampler path of the
caller's own (resolved through the caller's run records, so another tenant's answers 404 like
one that does not exist), or `<base model>;<tinker:// path>` (Tinker's spelling; the base
must be the one the checkpoint was trained on).
"""

from __future__ import annotations

import asyncio
from typing import Any

from rl.client.sampling import SamplingClient
from rl.errors import InvalidRequestError, NotFoundError
from rl.server.door_cache import Target
from rl.server.limits import LimitError
from rl.server.state import ServerState
from rl.server.store import tinker_path
from rl.types import ModelInput, SampleResponse, SamplingParams


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


__all__ = ["model_names", "sample", "target"]
