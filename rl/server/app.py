"""The HTTP routes of Tinker's protocol (SDK 0.38; every SDK >= 0.25 speaks the same).

Thin handlers: authenticate, parse the body with the `tinker` SDK's own types (or its
protobuf), call `ServerState`, answer. Conventions of the protocol, in one place:

- `X-API-Key` names the tenant (rl/server/keys.py); a missing or unknown key is 401. Only
  `GET /api/v1/healthz` answers without one.
- Long calls answer `{"request_id", "model_id"}` at once; `POST /retrieve_future` long-polls
  (`long_poll_s`) and answers `{"type": "try_again"}`, the result (protobuf for
  `ForwardBackwardOutput` and `SampleResponse`, JSON otherwise), or
  `{"error", "category"}` with category "user" for bad input.
- A body that does not parse is 400 with what is wrong; a body over `max_body_mib` is 413;
  an id of another tenant is 404 like an unknown one; a full sampling queue is 429.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import zstandard
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tinker import types as tt

from rl.errors import CheckpointError, InvalidRequestError, NotFoundError
from rl.server.keys import KeyStore
from rl.server.state import ServerState
from rl.server.store import CheckpointEntry, RunRecord, as_datetime, tinker_path
from rl.server.wire import (
    WireError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
)

logger = logging.getLogger("rl.server")
PROTOBUF = "application/x-protobuf"


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await _too_large(self.limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        {"detail": f"request body is larger than the server's limit of {limit} bytes"}, 413
    )


def create_app(state: ServerState, keys: KeyStore) -> FastAPI:
    app = FastAPI(title="engineroom Tinker-protocol server", docs_url=None, redoc_url=None)
    config = state.config
    app.add_middleware(BodyLimit, limit=int(config.max_body_mib * 2**20))

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return JSONResponse({"detail": f"malformed request body: {problems}"}, 400)

    @app.exception_handler(WireError)
    async def bad_wire(_: Request, error: WireError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, 400)

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, error: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, 404)

    @app.exception_handler(InvalidRequestError)
    @app.exception_handler(CheckpointError)
    async def invalid(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, 400)

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse({"detail": f"{type(error).__name__}: {error}"}, 500)

    def tenant(request: Request) -> str:
        name = keys.tenant_for(request.headers.get("x-api-key"))
        if name is None:
            raise _Unauthorized
        return name

    @app.exception_handler(_UnauthorizedError)
    async def unauthorized(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse({"detail": "missing or invalid API key (X-API-Key)"}, 401)

    def future(request_id: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"request_id": request_id, "model_id": model_id, **extra}

    # -- bootstrap and sessions ------------------------------------------------------------

    @app.get("/api/v1/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/client/config")
    async def client_config(_: str = Depends(tenant)) -> dict[str, Any]:
        # Conservative flags: no JWT exchange, per-request futures, client-side custom
        # losses, uncompressed protobuf, httpx's own transport.
        return tt.ClientConfigResponse(
            pjwt_auth_enabled=False,
            proto_compress_fwdbwd=False,
            use_pyqwest_transport=False,
            sample_use_retrieve_futures=False,
            custom_loss_server_side=False,
            sample_join_sampling_session=False,
            sample_max_concurrent_requests=config.max_inflight_samples,
            fwdbwd_max_chunk_len=config.max_chunk_datums,
        ).model_dump()

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config(_: str = Depends(tenant)) -> dict[str, Any]:
        return tt.ClientDynamicConfigResponse().model_dump()

    @app.post("/api/v1/create_session")
    async def create_session(
        body: tt.CreateSessionRequest, who: str = Depends(tenant)
    ) -> dict[str, Any]:
        return {"type": "create_session", "session_id": state.create_session(who, body)}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(body: tt.SessionHeartbeatRequest, who: str = Depends(tenant)) -> Response:
        if not state.heartbeat(who, body.session_id):
            return JSONResponse({"detail": "session finished"}, 410)
        return JSONResponse({"type": "session_heartbeat"})

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str, who: str = Depends(tenant)) -> Response:
        state.finish_session(who, session_id)
        return Response(status_code=200)

    @app.post("/api/v1/telemetry")
    async def telemetry(_: str = Depends(tenant)) -> dict[str, str]:
        return {"status": "accepted"}  # accepted and dropped: nothing leaves this machine

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities(_: str = Depends(tenant)) -> dict[str, Any]:
        return state.capabilities().model_dump()

    # -- training --------------------------------------------------------------------------

    @app.post("/api/v1/create_model")
    async def create_model(body: tt.CreateModelRequest, who: str = Depends(tenant)) -> Any:
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        return future(state.create_model(who, body), model_id)

    @app.post("/api/v1/get_info")
    async def get_info(body: tt.GetInfoRequest, who: str = Depends(tenant)) -> Any:
        return state.get_info(who, body.model_id).model_dump(mode="json")

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request, who: str = Depends(tenant)) -> Any:
        body = await request.body()
        if "zstd" in request.headers.get("content-encoding", ""):
            body = _unzstd(body, int(config.max_body_mib * 2**20) * 8)
        call = decode_forward_backward(body)
        return future(state.forward_backward(who, call), call.model_id)

    @app.post("/api/v1/optim_step")
    async def optim_step(body: tt.OptimStepRequest, who: str = Depends(tenant)) -> Any:
        return future(state.optim_step(who, body), body.model_id)

    @app.post("/api/v1/save_weights")
    async def save_weights(body: tt.SaveWeightsRequest, who: str = Depends(tenant)) -> Any:
        return future(state.save_weights(who, body), body.model_id)

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_for_sampler(
        body: tt.SaveWeightsForSamplerRequest, who: str = Depends(tenant)
    ) -> Any:
        return future(state.save_weights_for_sampler(who, body), body.model_id)

    @app.post("/api/v1/load_weights")
    async def load_weights(body: tt.LoadWeightsRequest, who: str = Depends(tenant)) -> Any:
        if body.session_id is not None and body.model_seq_id is not None:
            model_id = f"{body.session_id}:train:{body.model_seq_id}"
            return future(state.create_model_from_state(who, body), model_id)
        if body.model_id is None:
            raise InvalidRequestError("load_weights needs model_id or session_id + model_seq_id")
        return future(state.load_weights(who, body), body.model_id)

    # Endpoints of the protocol this server does not implement: a clear 400, not a bare 404.
    unsupported = {
        ("POST", "/save_weights_external"): "sampler checkpoints are standard PEFT "
        "directories already, on this machine",
        ("POST", "/create_custom_loss"): "this server tells the SDK to run custom losses "
        "client-side (custom_loss_server_side=false)",
        ("POST", "/copy_weights"): "load the checkpoint into a new training client instead",
        ("POST", "/unload_model"): "models are released when the server stops",
        ("POST", "/auth/token"): "this server takes API keys only (pjwt_auth_enabled=false)",
        ("POST", "/retrieve_futures"): "poll retrieve_future (sample_use_retrieve_futures=false)",
        ("POST", "/join_sampling_session"): "sample_join_sampling_session=false",
        ("POST", "/cancel_future"): "sample_cancel_enabled=false",
        ("POST", "/training_runs/{run_id}/checkpoints/{kind}/{name}/publish"): "checkpoints "
        "are private to their tenant",
        ("DELETE", "/training_runs/{run_id}/checkpoints/{kind}/{name}/publish"): "checkpoints "
        "are private to their tenant",
        ("GET", "/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls"): (
            "sampler checkpoints are standard PEFT directories already, on this machine"
        ),
    }
    for (method, path), why in unsupported.items():
        app.add_api_route(f"/api/v1{path}", _refusal(tenant, path, why), methods=[method])

    # -- sampling --------------------------------------------------------------------------

    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(
        body: tt.CreateSamplingSessionRequest, who: str = Depends(tenant)
    ) -> Any:
        import asyncio

        sampler_id = await asyncio.wrap_future(state.create_sampling_session(who, body))
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, who: str = Depends(tenant)) -> Any:
        sampler = state.sampler(who, sampler_id)
        return {
            "sampler_id": sampler_id,
            "base_model": sampler.base_model,
            "model_path": sampler.model_path,
        }

    @app.post("/api/v1/asample")
    async def asample(body: tt.SampleRequest, who: str = Depends(tenant)) -> Any:
        if state.sampling_busy():
            return JSONResponse(
                {"detail": "the sampling queue is full; back off and retry"},
                429,
                headers={"retry-after": "1"},
            )
        request_id = state.sample(who, body)
        ids = [f"{request_id}:{i}" for i in range(body.num_samples)]
        return future(request_id, sample_sequence_ids=ids)

    # -- futures ---------------------------------------------------------------------------

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(body: tt.FutureRetrieveRequest, who: str = Depends(tenant)) -> Any:
        item = state.futures.get(who, body.request_id)
        if not await state.futures.wait(item, config.long_poll_s):
            # 408 with the try_again body: the SDK re-polls at once, as for a 200 try_again,
            # but without logging a warning per poll.
            pending = {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
            return JSONResponse(pending, 408)
        error = item.future.exception()
        if error is not None:
            return {"error": str(error), "category": _category(error)}
        result = item.future.result()
        if item.encoding == "forward_backward":
            return Response(encode_forward_backward_output(result), media_type=PROTOBUF)
        if item.encoding == "sample":
            return Response(encode_sample_response(result), media_type=PROTOBUF)
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json", exclude_none=True)
        return result

    # -- REST: runs, checkpoints, weights --------------------------------------------------

    @app.get("/api/v1/training_runs")
    async def list_runs(
        limit: int = 20, offset: int = 0, who: str = Depends(tenant)
    ) -> dict[str, Any]:
        runs = state.runs.owned(who)
        page = runs[max(offset, 0) : max(offset, 0) + max(limit, 0)]
        return {
            "training_runs": [_training_run(state, r) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }

    @app.get("/api/v1/training_runs/{run_id}")
    async def get_run(run_id: str, who: str = Depends(tenant)) -> dict[str, Any]:
        return _training_run(state, state.runs.get(who, run_id))

    @app.get("/api/v1/training_runs/{run_id}/checkpoints")
    async def list_checkpoints(run_id: str, who: str = Depends(tenant)) -> dict[str, Any]:
        run = state.runs.get(who, run_id)
        items = [_checkpoint(run, cid, e) for cid, e in state.runs.checkpoints(run)]
        return {"checkpoints": items, "cursor": None}

    @app.get("/api/v1/checkpoints")
    async def list_user_checkpoints(
        limit: int = 100, offset: int = 0, who: str = Depends(tenant)
    ) -> dict[str, Any]:
        items = [
            _checkpoint(run, cid, e)
            for run in state.runs.owned(who)
            for cid, e in state.runs.checkpoints(run)
        ]
        items.sort(key=lambda c: c["time"], reverse=True)
        page = items[max(offset, 0) : max(offset, 0) + max(limit, 0)]
        return {
            "checkpoints": page,
            "cursor": {"offset": offset, "limit": limit, "total_count": len(items)},
        }

    @app.delete("/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(
        run_id: str, kind: str, name: str, who: str = Depends(tenant)
    ) -> Response:
        state.runs.delete(who, run_id, f"{kind}/{name}")
        return Response(status_code=200)

    @app.put("/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
    async def set_ttl(
        run_id: str, kind: str, name: str, request: Request, who: str = Depends(tenant)
    ) -> Response:
        body = await _json(request)
        ttl = body.get("ttl_seconds")
        if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
            raise InvalidRequestError(
                f"ttl_seconds must be a positive integer or null, got {ttl!r}"
            )
        state.runs.set_ttl(who, run_id, f"{kind}/{name}", ttl)
        return Response(status_code=200)

    @app.post("/api/v1/weights_info")
    async def weights_info(request: Request, who: str = Depends(tenant)) -> dict[str, Any]:
        body = await _json(request)
        resolved = state.runs.resolve(who, body.get("tinker_path"))  # type: ignore[arg-type]
        lora = resolved.run.lora
        return tt.WeightsInfoResponse(
            base_model=resolved.run.base_model,
            is_lora=True,
            lora_rank=resolved.run.lora_rank,
            train_unembed=lora.get("train_unembed"),
            train_mlp=lora.get("train_mlp"),
            train_attn=lora.get("train_attn"),
        ).model_dump(mode="json")

    return app


def _refusal(tenant: Any, path: str, why: str) -> Any:
    async def refuse(_: str = Depends(tenant)) -> Any:
        raise InvalidRequestError(f"{path} is not supported by this server: {why}")

    return refuse


class _UnauthorizedError(Exception):
    pass


_Unauthorized = _UnauthorizedError()


def _category(error: BaseException) -> str:
    user = (InvalidRequestError, NotFoundError, CheckpointError, ValueError, KeyError, TypeError)
    return "user" if isinstance(error, user) else "server"


def _unzstd(body: bytes, limit: int) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise WireError(f"the zstd-encoded body does not decompress: {e}") from None


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise WireError(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise WireError("the JSON body must be an object")
    return body


def _training_run(state: ServerState, run: RunRecord) -> dict[str, Any]:
    checkpoints = state.runs.checkpoints(run)

    def last(kind: str) -> dict[str, Any] | None:
        items = [(c, e) for c, e in checkpoints if c.startswith(f"{kind}/")]
        if not items:
            return None
        cid, entry = max(items, key=lambda item: item[1].created)
        return _checkpoint(run, cid, entry)

    return {
        "training_run_id": run.run_id,
        "base_model": run.base_model,
        "model_owner": run.tenant,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora_rank,
        "last_request_time": as_datetime(run.last_request_time).isoformat(),
        "last_checkpoint": last("weights"),
        "last_sampler_checkpoint": last("sampler_weights"),
        "user_metadata": run.user_metadata,
    }


def _checkpoint(run: RunRecord, checkpoint_id: str, entry: CheckpointEntry) -> dict[str, Any]:
    kind, name = checkpoint_id.split("/", 1)
    return {
        "checkpoint_id": checkpoint_id,
        "checkpoint_type": "training" if kind == "weights" else "sampler",
        "time": as_datetime(entry.created).isoformat(),
        "tinker_path": tinker_path(run.run_id, kind, name),
        "public": False,
        "user_metadata": entry.user_metadata,
        "expires_at": as_datetime(entry.expires_at).isoformat() if entry.expires_at else None,
    }


__all__ = ["create_app"]
