"""The REST side: training runs, their checkpoints (list, delete, TTL), and what a checkpoint
holds (`weights_info`). Runs and checkpoints are the tenant's own; another tenant's are 404."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from tinker import types as tt

from rl.errors import InvalidRequestError
from rl.server.routes.common import State, Tenant, json_body
from rl.server.state import ServerState
from rl.server.store import CheckpointEntry, RunRecord, as_datetime, tinker_path

T = TypeVar("T")

router = APIRouter()


@router.get("/training_runs")
async def list_runs(who: Tenant, state: State, limit: int = 20, offset: int = 0) -> dict[str, Any]:
    page, cursor = _page(state.runs.owned(who), offset, limit)
    return {"training_runs": [_training_run(state, r) for r in page], "cursor": cursor}


@router.get("/training_runs/{run_id}")
async def get_run(run_id: str, who: Tenant, state: State) -> dict[str, Any]:
    return _training_run(state, state.runs.get(who, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, who: Tenant, state: State) -> dict[str, Any]:
    run = state.runs.get(who, run_id)
    items = [_checkpoint(run, cid, e) for cid, e in state.runs.checkpoints(run)]
    return {"checkpoints": items, "cursor": None}


@router.get("/checkpoints")
async def list_user_checkpoints(
    who: Tenant, state: State, limit: int = 100, offset: int = 0
) -> dict[str, Any]:
    items = [
        _checkpoint(run, cid, e)
        for run in state.runs.owned(who)
        for cid, e in state.runs.checkpoints(run)
    ]
    items.sort(key=lambda c: c["time"], reverse=True)
    page, cursor = _page(items, offset, limit)
    return {"checkpoints": page, "cursor": cursor}


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
async def delete_checkpoint(
    run_id: str, kind: str, name: str, who: Tenant, state: State
) -> Response:
    state.runs.delete(who, run_id, f"{kind}/{name}")
    return Response(status_code=200)


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
async def set_ttl(
    run_id: str, kind: str, name: str, request: Request, who: Tenant, state: State
) -> Response:
    body = await json_body(request)
    ttl = body.get("ttl_seconds")
    if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
        raise InvalidRequestError(f"ttl_seconds must be a positive integer or null, got {ttl!r}")
    state.runs.set_ttl(who, run_id, f"{kind}/{name}", ttl)
    return Response(status_code=200)


@router.post("/weights_info")
async def weights_info(request: Request, who: Tenant, state: State) -> dict[str, Any]:
    body = await json_body(request)
    # resolve answers a missing or non-string path with a 400
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


def _page(items: list[T], offset: int, limit: int) -> tuple[list[T], dict[str, int]]:
    """`limit` items from `offset` (negatives count as 0), and the cursor that describes them."""
    start = max(offset, 0)
    cursor = {"offset": offset, "limit": limit, "total_count": len(items)}
    return items[start : start + max(limit, 0)], cursor


def _training_run(state: ServerState, run: RunRecord) -> dict[str, Any]:
    checkpoints = state.runs.checkpoints(run)
    return {
        "training_run_id": run.run_id,
        "base_model": run.base_model,
        "model_owner": run.tenant,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora_rank,
        "last_request_time": as_datetime(run.last_request_time).isoformat(),
        "last_checkpoint": _last(run, checkpoints, "weights"),
        "last_sampler_checkpoint": _last(run, checkpoints, "sampler_weights"),
        "user_metadata": run.user_metadata,
    }


def _last(
    run: RunRecord, checkpoints: list[tuple[str, CheckpointEntry]], kind: str
) -> dict[str, Any] | None:
    """The newest of `run`'s checkpoints of `kind`, or None."""
    items = [(c, e) for c, e in checkpoints if c.startswith(f"{kind}/")]
    if not items:
        return None
    cid, entry = max(items, key=lambda item: item[1].created)
    return _checkpoint(run, cid, entry)


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
