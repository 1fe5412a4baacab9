"""Training models: create, forward_backward (and custom losses), optim_step, save and load."""

from __future__ import annotations

import asyncio
from typing import Any

import zstandard
from fastapi import APIRouter, Request
from tinker import types as tt

from rl.errors import InvalidRequestError
from rl.server.routes.common import State, Tenant, future
from rl.server.wire import WireError, decode_forward_backward

router = APIRouter()


@router.post("/create_model")
async def create_model(body: tt.CreateModelRequest, who: Tenant, state: State) -> dict[str, Any]:
    model_id = f"{body.session_id}:train:{body.model_seq_id}"
    return future(state.create_model(who, body), model_id)


@router.post("/unload_model")
async def unload_model(body: tt.UnloadModelRequest, who: Tenant, state: State) -> dict[str, Any]:
    """Releases the model at once: its adapter, optimizer state and sampler weights."""
    await asyncio.to_thread(state.unload_model, who, body.model_id)
    return tt.UnloadModelResponse(model_id=body.model_id, type="unload_model").model_dump()


@router.post("/get_info")
async def get_info(body: tt.GetInfoRequest, who: Tenant, state: State) -> dict[str, Any]:
    return state.get_info(who, body.model_id).model_dump(mode="json")


@router.post("/forward_backward")
async def forward_backward(request: Request, who: Tenant, state: State) -> dict[str, Any]:
    # Protobuf, not JSON: the body is read and decoded here rather than by FastAPI.
    body = await request.body()
    if "zstd" in request.headers.get("content-encoding", ""):
        body = _unzstd(body, int(state.config.max_body_mib * 2**20) * 8)
    call = decode_forward_backward(body)
    return future(state.forward_backward(who, call), call.model_id)


@router.post("/create_custom_loss")
async def create_custom_loss(
    body: tt.CreateCustomLossRequest, who: Tenant, state: State
) -> dict[str, Any]:
    """Stores a traced loss graph for `loss_fn="custom"`; the future holds its loss id."""
    return future(state.create_custom_loss(who, body))


@router.post("/optim_step")
async def optim_step(body: tt.OptimStepRequest, who: Tenant, state: State) -> dict[str, Any]:
    return future(state.optim_step(who, body), body.model_id)


@router.post("/save_weights")
async def save_weights(body: tt.SaveWeightsRequest, who: Tenant, state: State) -> dict[str, Any]:
    return future(state.save_weights(who, body), body.model_id)


@router.post("/save_weights_for_sampler")
async def save_for_sampler(
    body: tt.SaveWeightsForSamplerRequest, who: Tenant, state: State
) -> dict[str, Any]:
    return future(state.save_weights_for_sampler(who, body), body.model_id)


@router.post("/load_weights")
async def load_weights(body: tt.LoadWeightsRequest, who: Tenant, state: State) -> dict[str, Any]:
    if body.session_id is not None and body.model_seq_id is not None:
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        return future(state.create_model_from_state(who, body), model_id)
    if body.model_id is None:
        raise InvalidRequestError("load_weights needs model_id or session_id + model_seq_id")
    return future(state.load_weights(who, body), body.model_id)


def _unzstd(body: bytes, limit: int) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise WireError(f"the zstd-encoded body does not decompress: {e}") from None
