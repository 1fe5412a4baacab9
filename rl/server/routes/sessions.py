"""Bootstrap and sessions: health, the client's configuration, sessions and their heartbeats,
telemetry, and what the server serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from tinker import types as tt

from rl.server.routes.common import State, Tenant

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/client/config")
async def client_config(_: Tenant, state: State) -> dict[str, Any]:
    # Conservative flags: no JWT exchange, per-request futures, uncompressed protobuf, httpx's
    # own transport. Custom losses run on the server: the SDK uploads a LossHandle's graph
    # (create_custom_loss) only when this flag says so, else it runs the loss itself.
    return tt.ClientConfigResponse(
        pjwt_auth_enabled=False,
        proto_compress_fwdbwd=False,
        use_pyqwest_transport=False,
        sample_use_retrieve_futures=False,
        custom_loss_server_side=True,
        sample_join_sampling_session=False,
        sample_max_concurrent_requests=state.config.max_inflight_samples,
        fwdbwd_max_chunk_len=state.config.max_chunk_datums,
    ).model_dump()


@router.post("/client/dynamic_config")
async def dynamic_config(_: Tenant) -> dict[str, Any]:
    return tt.ClientDynamicConfigResponse().model_dump()


@router.post("/create_session")
async def create_session(
    body: tt.CreateSessionRequest, who: Tenant, state: State
) -> dict[str, Any]:
    return {"type": "create_session", "session_id": state.create_session(who, body)}


@router.post("/session_heartbeat")
async def heartbeat(body: tt.SessionHeartbeatRequest, who: Tenant, state: State) -> Response:
    if not state.heartbeat(who, body.session_id):
        return JSONResponse({"detail": "session finished"}, 410)
    return JSONResponse({"type": "session_heartbeat"})


@router.post("/sessions/{session_id}/finish")
async def finish(session_id: str, who: Tenant, state: State) -> Response:
    state.finish_session(who, session_id)
    return Response(status_code=200)


@router.post("/telemetry")
async def telemetry(_: Tenant) -> dict[str, str]:
    return {"status": "accepted"}  # accepted and dropped: nothing leaves this machine


@router.get("/get_server_capabilities")
async def capabilities(_: Tenant, state: State) -> dict[str, Any]:
    return state.capabilities().model_dump()
