"""`retrieve_future`: the long poll that answers every long call. A result is protobuf for
`ForwardBackwardOutput` and `SampleResponse`, JSON otherwise; a failure is
`{"error", "category"}`, with category "user" for bad input."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from tinker import types as tt

from rl.errors import CheckpointError, InvalidRequestError, NotFoundError
from rl.server.routes.common import State, Tenant
from rl.server.wire import encode_forward_backward_output, encode_sample_response

PROTOBUF = "application/x-protobuf"

router = APIRouter()


@router.post("/retrieve_future", response_model=None)
async def retrieve_future(
    body: tt.FutureRetrieveRequest, who: Tenant, state: State
) -> Response | dict[str, Any]:
    item = state.futures.get(who, body.request_id)
    if not await state.futures.wait(item, state.config.long_poll_s):
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


def _category(error: BaseException) -> str:
    user = (InvalidRequestError, NotFoundError, CheckpointError, ValueError, KeyError, TypeError)
    return "user" if isinstance(error, user) else "server"
