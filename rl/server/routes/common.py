"""What every route module shares: who is asking, the server's state, the answer of a long
call, and JSON bodies."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request

from rl.server.keys import KeyStore
from rl.server.state import ServerState
from rl.server.wire import WireError


class UnauthorizedError(Exception):
    """A missing or unknown X-API-Key; the app answers it with 401."""


def tenant(request: Request) -> str:
    """The tenant that the request's X-API-Key names.

    A plain `def`, so FastAPI runs it in its thread pool: the key store re-reads its file.
    """
    keys: KeyStore = request.app.state.keys
    name = keys.tenant_for(request.headers.get("x-api-key"))
    if name is None:
        raise UnauthorizedError
    return name


async def server_state(request: Request) -> ServerState:
    """The `ServerState` that `create_app` stored on the app."""
    state: ServerState = request.app.state.server_state
    return state


# Parameter types for handlers: `who: Tenant` authenticates (401 before the body is parsed),
# `state: State` is the server's state.
Tenant = Annotated[str, Depends(tenant)]
State = Annotated[ServerState, Depends(server_state)]


def future(request_id: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """The immediate answer of a long call; the client polls `retrieve_future` with it."""
    return {"request_id": request_id, "model_id": model_id, **extra}


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (an empty body is `{}`); a `WireError` (400) otherwise."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise WireError(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise WireError("the JSON body must be an object")
    return body
