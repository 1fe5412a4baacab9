"""What the OpenAI and Anthropic routes (openai.py, anthropic.py) share: the caller's key from
either client's header, the model's sampling client and tokenizer, and answers whose errors
take each API's own shape (`error_body`) instead of the Tinker routes' `{"detail": ...}`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from rl.client.sampling import SamplingClient
from rl.errors import CheckpointError, InvalidRequestError, NotFoundError
from rl.server.inference import target
from rl.server.keys import KeyStore
from rl.server.limits import LimitError
from rl.server.routes.common import UnauthorizedError, json_body
from rl.server.state import ServerState
from rl.server.wire import WireError

logger = logging.getLogger("rl.server")
M = TypeVar("M", bound=BaseModel)
ErrorBody = Callable[[int, str], dict[str, Any]]


def api_key(request: Request) -> str | None:
    """The key of `x-api-key` (the Tinker and Anthropic clients send it) or of
    `Authorization: Bearer` (the OpenAI client's)."""
    key = request.headers.get("x-api-key")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not key and scheme.lower() == "bearer":
        key = token.strip()
    return key or None


def tenant_of(request: Request) -> str:
    """The tenant the request's key names; UnauthorizedError otherwise. Blocking: the key
    store may re-read its file."""
    keys: KeyStore = request.app.state.keys
    name = keys.tenant_for(api_key(request))
    if name is None:
        raise UnauthorizedError
    return name


async def answer(
    request: Request, handle: Callable[[str], Awaitable[Response]], error_body: ErrorBody
) -> Response:
    """`handle(tenant)` for an authenticated request; an error as `error_body` shapes it."""
    try:
        who = await asyncio.to_thread(tenant_of, request)
        return await handle(who)
    except Exception as error:
        status = status_of(error)
        if status == 500:
            logger.exception("request failed")
        headers = {"retry-after": "1"} if status == 429 else None
        return JSONResponse(error_body(status, _message(error)), status, headers=headers)


async def body_of(request: Request, model: type[M]) -> M:
    """The request's JSON body as `model`; a ValidationError (400) naming the bad fields."""
    return model.model_validate(await json_body(request))


async def sampler(
    request: Request, state: ServerState, tenant: str, model: str
) -> tuple[SamplingClient, Any]:
    """The sampling client of `model` for `tenant` and the model's tokenizer."""

    def get() -> tuple[SamplingClient, Any]:
        client = state.door_samplers.client(tenant, target(state, tenant, model))
        return client, client.get_tokenizer()

    return await asyncio.to_thread(get)


def events(chunks: list[bytes]) -> StreamingResponse:
    """Server-sent events, all made already."""
    headers = {"cache-control": "no-cache"}
    return StreamingResponse(iter(chunks), media_type="text/event-stream", headers=headers)


def status_of(error: BaseException) -> int:
    if isinstance(error, UnauthorizedError):
        return 401
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, LimitError):
        return 429
    bad_request = (InvalidRequestError, CheckpointError, WireError, ValidationError)
    return 400 if isinstance(error, bad_request) else 500


def _message(error: BaseException) -> str:
    if isinstance(error, UnauthorizedError):
        return "missing or invalid API key (Authorization: Bearer or x-api-key)"
    if isinstance(error, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return f"malformed request body: {problems}"
    if status_of(error) == 500:
        return f"{type(error).__name__}: {error}"
    return str(error)


__all__ = ["answer", "api_key", "body_of", "events", "sampler", "status_of", "tenant_of"]
