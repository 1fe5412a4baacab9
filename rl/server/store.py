"""Training runs and their checkpoints, on disk, per tenant: what survives a server restart.

    <home>/runs/<run dir>.json                     one record per training run (below)
    <checkpoints>/<run dir>/weights/<name>/        written by the trainer (rl/checkpoint_format.py)
    <checkpoints>/<run dir>/sampler_weights/<name>/

A run record holds the owner (tenant), base model, LoRA config, the user's metadata (the
cookbook reads `renderer_name` back from it when it resumes) and one entry per checkpoint
(time, user metadata, expiry). Tinker paths `tinker://<run id>/<kind>/<name>` resolve through
the record only: the run must exist and belong to the caller, the name must be one path
component, and the directory must exist, else NotFoundError, exactly as for an unknown id, so
one tenant learns nothing of another's runs. No client-supplied text ever becomes a path on
its own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rl.checkpoint_format import check_checkpoint_name, run_directory
from rl.errors import InvalidRequestError, NotFoundError

KINDS = {"weights": "training", "sampler_weights": "sampler"}


@dataclass
class CheckpointEntry:
    created: float
    user_metadata: dict[str, str] | None = None
    expires_at: float | None = None


@dataclass
class RunRecord:
    run_id: str
    tenant: str
    base_model: str
    lora_rank: int
    lora: dict[str, Any]
    user_metadata: dict[str, str] | None
    created: float
    last_request_time: float
    checkpoints: dict[str, CheckpointEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.__dict__.items() if k != "checkpoints"},
            "checkpoints": {k: v.__dict__ for k, v in self.checkpoints.items()},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunRecord:
        checkpoints = {k: CheckpointEntry(**v) for k, v in raw.pop("checkpoints", {}).items()}
        return cls(**raw, checkpoints=checkpoints)


@dataclass(frozen=True)
class ResolvedPath:
    run: RunRecord
    kind: str  # "weights" | "sampler_weights"
    name: str
    local: Path

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


class RunStore:
    def __init__(self, home: Path, checkpoint_root: Path):
        self.runs_dir = home / "runs"
        self.checkpoint_root = checkpoint_root
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._runs: dict[str, RunRecord] = {}
        for path in sorted(self.runs_dir.glob("*.json")):
            record = RunRecord.from_json(json.loads(path.read_text()))
            self._runs[record.run_id] = record

    # -- runs ------------------------------------------------------------------------------

    def create(self, record: RunRecord) -> None:
        with self._lock:
            self._runs[record.run_id] = record
            self._write(record)

    def get(self, tenant: str, run_id: str) -> RunRecord:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None or run.tenant != tenant:
            raise NotFoundError(f"training run {run_id!r} not found")
        return run

    def owned(self, tenant: str) -> list[RunRecord]:
        with self._lock:
            runs = [r for r in self._runs.values() if r.tenant == tenant]
        return sorted(runs, key=lambda r: r.created, reverse=True)

    def touch(self, run_id: str) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.last_request_time = time.time()  # in memory; written with the next change

    # -- checkpoints -----------------------------------------------------------------------

    def add_checkpoint(
        self,
        run_id: str,
        kind: str,
        name: str,
        user_metadata: dict[str, str] | None,
        ttl_seconds: int | None,
    ) -> str:
        """Records a checkpoint the trainer has written; returns its tinker path."""
        now = time.time()
        with self._lock:
            run = self._runs[run_id]
            run.checkpoints[f"{kind}/{name}"] = CheckpointEntry(
                created=now,
                user_metadata=user_metadata,
                expires_at=now + ttl_seconds if ttl_seconds else None,
            )
            run.last_request_time = now
            self._write(run)
        return tinker_path(run_id, kind, name)

    def checkpoints(self, run: RunRecord) -> list[tuple[str, CheckpointEntry]]:
        self.expire()
        with self._lock:
            items = list(run.checkpoints.items())
        return [(cid, entry) for cid, entry in items if self._local(run, cid).is_dir()]

    def resolve(
        self, tenant: str, path: str, *, kinds: tuple[str, ...] = tuple(KINDS)
    ) -> ResolvedPath:
        """A `tinker://<run>/<kind>/<name>` path of `tenant`'s, as a checked local directory."""
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise InvalidRequestError(
                f"path {path!r}: expected tinker://<run id>/<weights|sampler_weights>/<name>"
            )
        parts = path[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise InvalidRequestError(
                f"path {path!r}: expected tinker://<run id>/<weights|sampler_weights>/<name>"
            )
        run_id, kind, name = parts
        check_checkpoint_name(name)
        if kind not in kinds:
            raise InvalidRequestError(f"path {path!r}: a {kind!r} checkpoint cannot be used here")
        self.expire()
        run = self.get(tenant, run_id)
        local = self._local(run, f"{kind}/{name}")
        if f"{kind}/{name}" not in run.checkpoints or not local.is_dir():
            raise NotFoundError(f"checkpoint {path!r} not found")
        return ResolvedPath(run, kind, name, local)

    def delete(self, tenant: str, run_id: str, checkpoint_id: str) -> None:
        resolved = self.resolve(tenant, f"tinker://{run_id}/{checkpoint_id}")
        with self._lock:
            resolved.run.checkpoints.pop(resolved.checkpoint_id, None)
            self._write(resolved.run)
        shutil.rmtree(resolved.local, ignore_errors=True)

    def set_ttl(self, tenant: str, run_id: str, checkpoint_id: str, ttl: int | None) -> None:
        resolved = self.resolve(tenant, f"tinker://{run_id}/{checkpoint_id}")
        with self._lock:
            entry = resolved.run.checkpoints[resolved.checkpoint_id]
            entry.expires_at = time.time() + ttl if ttl else None
            self._write(resolved.run)

    def expire(self) -> None:
        """Deletes checkpoints past their TTL."""
        now = time.time()
        doomed: list[Path] = []
        with self._lock:
            for run in self._runs.values():
                gone = [
                    cid
                    for cid, e in run.checkpoints.items()
                    if e.expires_at is not None and e.expires_at <= now
                ]
                for cid in gone:
                    del run.checkpoints[cid]
                    doomed.append(self._local(run, cid))
                if gone:
                    self._write(run)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------

    def _local(self, run: RunRecord, checkpoint_id: str) -> Path:
        return self.checkpoint_root / run_directory(run.run_id) / checkpoint_id

    def _write(self, run: RunRecord) -> None:
        target = self.runs_dir / f"{run_directory(run.run_id)}.json"
        fd, tmp = tempfile.mkstemp(dir=self.runs_dir, prefix=".run-")
        with os.fdopen(fd, "w") as handle:
            json.dump(run.to_json(), handle, indent=2)
        os.replace(tmp, target)


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{kind}/{name}"


def as_datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


__all__ = ["KINDS", "CheckpointEntry", "ResolvedPath", "RunRecord", "RunStore", "tinker_path"]
