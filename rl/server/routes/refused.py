"""The endpoints of the protocol this server does not implement: each answers (after the API
key is checked) a 400 that says why, not a bare 404."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from fastapi import APIRouter

from rl.errors import InvalidRequestError
from rl.server.routes.common import Tenant

router = APIRouter()

_CHECKPOINT = "/training_runs/{run_id}/checkpoints/{kind}/{name}"
_PEFT_ALREADY = "sampler checkpoints are standard PEFT directories already, on this machine"

# (method, path) -> why this server refuses it.
REFUSED: dict[tuple[str, str], str] = {
    ("POST", "/save_weights_external"): _PEFT_ALREADY,
    ("POST", "/copy_weights"): "load the checkpoint into a new training client instead",
    ("POST", "/auth/token"): "this server takes API keys only (pjwt_auth_enabled=false)",
    ("POST", "/retrieve_futures"): "poll retrieve_future (sample_use_retrieve_futures=false)",
    ("POST", "/join_sampling_session"): "sample_join_sampling_session=false",
    ("POST", "/cancel_future"): "sample_cancel_enabled=false",
    ("POST", f"{_CHECKPOINT}/publish"): "checkpoints are private to their tenant",
    ("DELETE", f"{_CHECKPOINT}/publish"): "checkpoints are private to their tenant",
    ("GET", f"{_CHECKPOINT}/external_weights_urls"): _PEFT_ALREADY,
}


def _refusal(path: str, why: str) -> Callable[[str], Coroutine[Any, Any, NoReturn]]:
    """A handler that authenticates, then refuses `path` with `why`."""

    async def refuse(_: Tenant) -> NoReturn:
        raise InvalidRequestError(f"{path} is not supported by this server: {why}")

    return refuse


def _add_refusals(router: APIRouter) -> None:
    for (method, path), why in REFUSED.items():
        router.add_api_route(path, _refusal(path, why), methods=[method], response_model=None)


_add_refusals(router)
