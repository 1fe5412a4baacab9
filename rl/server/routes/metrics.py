"""`GET /metrics`: the server's metrics in Prometheus text (rl/server/metrics.py), at the root,
where Prometheus looks by default, not under `/api/v1`.

No key by default: scrapers usually have none, and the server binds loopback. With
`--metrics_key_required` any tenant's key opens it, as `X-API-Key` or as the
`Authorization: Bearer` a Prometheus scrape config sends. Either way it shows every tenant's
name and counts.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from rl.server.keys import KeyStore
from rl.server.routes.common import State, UnauthorizedError

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request, state: State) -> Response:
    if state.config.metrics_key_required:
        await asyncio.to_thread(_authenticate, request)  # the key store may re-read its file
    return Response(await state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _authenticate(request: Request) -> None:
    keys: KeyStore = request.app.state.keys
    key = request.headers.get("x-api-key")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not key and scheme.lower() == "bearer":
        key = token.strip()
    if keys.tenant_for(key) is None:
        raise UnauthorizedError
