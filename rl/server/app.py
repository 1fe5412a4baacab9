"""The FastAPI app of Tinker's protocol (SDK 0.38; every SDK >= 0.25 speaks the same): the body
limit, the error answers, and the routers of rl/server/routes/, one per concern, under `/api/v1`.

Thin handlers: authenticate, parse the body with the `tinker` SDK's own types (or its
protobuf), call `ServerState`, answer. Conventions of the protocol, in one place:

- `X-API-Key` names the tenant (rl/server/keys.py); a missing or unknown key is 401. Only
  `GET /api/v1/healthz` and `GET /metrics` (unless `--metrics_key_required`) answer without one.
- Long calls answer `{"request_id", "model_id"}` at once; `POST /retrieve_future` long-polls
  (`long_poll_s`) and answers `{"type": "try_again"}`, the result (protobuf for
  `ForwardBackwardOutput` and `SampleResponse`, JSON otherwise), or
  `{"error", "category"}` with category "user" for bad input.
- A body that does not parse is 400 with what is wrong; a body over `max_body_mib` is 413;
  an id of another tenant is 404 like an unknown one; a full sampling queue, or a tenant's
  full in-flight cap, is 429 for a sample (rl/server/limits.py).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rl.errors import CheckpointError, InvalidRequestError, NotFoundError
from rl.server.keys import KeyStore
from rl.server.metrics import RequestTimer
from rl.server.routes import (
    anthropic,
    futures,
    metrics,
    openai,
    refused,
    runs,
    sampling,
    sessions,
    training,
)
from rl.server.routes.common import UnauthorizedError
from rl.server.state import ServerState
from rl.server.wire import WireError

logger = logging.getLogger("rl.server")
PREFIX = "/api/v1"


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
    """The server's app; its handlers find `state` and `keys` on `app.state`."""
    app = FastAPI(title="engineroom Tinker-protocol server", docs_url=None, redoc_url=None)
    app.state.server_state = state
    app.state.keys = keys
    app.add_middleware(BodyLimit, limit=int(state.config.max_body_mib * 2**20))
    app.add_middleware(RequestTimer, metrics=state.metrics)  # outermost: times the 413s too
    app.exception_handler(RequestValidationError)(_malformed_body)
    app.exception_handler(UnauthorizedError)(_unauthorized)
    app.exception_handler(NotFoundError)(_not_found)
    for bad_request in (WireError, InvalidRequestError, CheckpointError):
        app.exception_handler(bad_request)(_bad_request)
    app.exception_handler(Exception)(_failed)
    for routes in (sessions, training, refused, sampling, futures, runs):
        app.include_router(routes.router, prefix=PREFIX)
    app.include_router(metrics.router)  # GET /metrics, where Prometheus looks
    # OpenAI- and Anthropic-compatible doors, at Tinker's paths
    app.include_router(openai.router, prefix="/oai/api/v1")
    app.include_router(anthropic.router, prefix="/anthropic/api/v1")
    return app


async def _malformed_body(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
    )
    return JSONResponse({"detail": f"malformed request body: {problems}"}, 400)


async def _unauthorized(_: Request, __: UnauthorizedError) -> JSONResponse:
    return JSONResponse({"detail": "missing or invalid API key (X-API-Key)"}, 401)


async def _not_found(_: Request, error: NotFoundError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, 404)


async def _bad_request(_: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, 400)


async def _failed(_: Request, error: Exception) -> JSONResponse:
    logger.exception("request failed")
    return JSONResponse({"detail": f"{type(error).__name__}: {error}"}, 500)


__all__ = ["create_app"]
