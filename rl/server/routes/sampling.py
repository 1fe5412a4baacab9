"""Sampling: sampling sessions (a base model or a sampler checkpoint) and `asample`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from tinker import types as tt

from rl.server.provenance import sequence_ids
from rl.server.routes.common import State, Tenant, future
from rl.server.state import ServerState

router = APIRouter()


@router.post("/create_sampling_session")
async def create_sampling_session(
    body: tt.CreateSamplingSessionRequest, who: Tenant, state: State
) -> dict[str, Any]:
    sampler_id = await asyncio.wrap_future(state.create_sampling_session(who, body))
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, who: Tenant, state: State) -> dict[str, str | None]:
    sampler = state.sampler(who, sampler_id)
    return {
        "sampler_id": sampler_id,
        "base_model": sampler.base_model,
        "model_path": sampler.model_path,
    }


@router.post("/asample", response_model=None)
async def asample(body: tt.SampleRequest, who: Tenant, state: State) -> Response | dict[str, Any]:
    busy = _busy(state, who)
    if busy is not None:
        limit, detail = busy
        state.metrics.limited(who, limit)
        # The SDK's sampling client retries a 429 for as long as it takes.
        return JSONResponse({"detail": detail}, 429, headers={"retry-after": "1"})
    request_id = state.sample(who, body)
    ids = sequence_ids(body.sampling_session_id or "", request_id, body.num_samples)
    return future(request_id, sample_sequence_ids=ids)


def _busy(state: ServerState, who: str) -> tuple[str, str] | None:
    """(the limit, why) when a sample must wait: the server's queue or the tenant's is full."""
    if state.sampling_busy():
        return "sampling_queue", "the sampling queue is full; back off and retry"
    if not state.limits.has_room(who):
        cap = state.config.max_inflight_per_tenant
        return "inflight", (
            f"tenant {who!r} has {cap} calls in flight, this server's cap "
            "(--max_inflight_per_tenant); back off and retry"
        )
    return None
