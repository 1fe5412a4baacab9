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

Durability (one server per home): a record is written atomically and durably
(`rl.durable.write_atomically`), and only after the trainer has renamed the checkpoint into place
and its files and directories have been fsync'd, so a save that returned survives `kill -9`
and power loss, and one that did not is either complete or absent. When the store opens, each
run's checkpoint directories are put in step with its record (`_recover`): what a killed save
left behind is removed, and a checkpoint cut off in the middle of an overwrite is put back.

Storage cap: `tenant_bytes` is what a tenant's recorded checkpoints hold on disk (each measured
once, when recorded or first asked); `check_room` refuses a save that would take it over the
server's `--max_checkpoint_gib_per_tenant`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rl.checkpoint_format import check_checkpoint_name, run_directory
from rl.durable import fsync_directory, write_atomically
from rl.errors import InvalidRequestError, NotFoundError

KINDS = {"weights": "training", "sampler_weights": "sampler"}
GIB = 2**30
logger = logging.getLogger("rl.server")
# What rl/checkpoint_format.py's write_checkpoint leaves when it is killed: the new checkpoint
# being written, and the old one moved aside while an overwrite swaps them.
_WRITING = re.compile(r"^\.(?P<name>.+)\.tmp-[^/]*$")
_MOVED_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-\d+$")


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
        self._sizes: dict[tuple[str, str], int] = {}  # (run id, checkpoint id) -> bytes
        for stale in self.runs_dir.glob(".*.json.*"):  # a record write cut off by a kill
            stale.unlink(missing_ok=True)
        for path in sorted(self.runs_dir.glob("*.json")):
            record = _read_record(path)
            if record is not None:
                self._runs[record.run_id] = record
                self._recover(record)

    # -- runs ------------------------------------------------------------------------------

    def create(self, record: RunRecord) -> None:
        with self._lock:
            self._write(record)
            self._runs[record.run_id] = record

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
        """Records a checkpoint the trainer has written; returns its tinker path. Its files are
        made durable first, so a listed checkpoint is never one that a crash could cut off."""
        with self._lock:
            run = self._runs[run_id]
        checkpoint_id = f"{kind}/{name}"
        size = _sync_tree(self._local(run, checkpoint_id), self.checkpoint_root)
        now = time.time()

        def change() -> None:
            run.checkpoints[checkpoint_id] = CheckpointEntry(
                created=now,
                user_metadata=user_metadata,
                expires_at=now + ttl_seconds if ttl_seconds else None,
            )
            run.last_request_time = now

        with self._lock:
            self._change(run, change)
            self._sizes[(run_id, checkpoint_id)] = size
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
        """Forgets the checkpoint (durably), then removes its files: a kill in between leaves a
        directory no record names, which the next start removes."""
        resolved = self.resolve(tenant, f"tinker://{run_id}/{checkpoint_id}")
        with self._lock:
            self._change(resolved.run, lambda: resolved.run.checkpoints.pop(resolved.checkpoint_id))
            self._sizes.pop((run_id, resolved.checkpoint_id), None)
        shutil.rmtree(resolved.local, ignore_errors=True)

    def set_ttl(self, tenant: str, run_id: str, checkpoint_id: str, ttl: int | None) -> None:
        resolved = self.resolve(tenant, f"tinker://{run_id}/{checkpoint_id}")

        def change() -> None:
            entry = resolved.run.checkpoints[resolved.checkpoint_id]
            entry.expires_at = time.time() + ttl if ttl else None

        with self._lock:
            self._change(resolved.run, change)

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
                if not gone:
                    continue
                self._change(run, functools.partial(_drop, run, gone))
                for cid in gone:
                    self._sizes.pop((run.run_id, cid), None)
                    doomed.append(self._local(run, cid))
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    # -- storage per tenant ----------------------------------------------------------------

    def tenant_bytes(self, tenant: str) -> int:
        """Bytes on disk of `tenant`'s recorded checkpoints, what its storage cap counts."""
        self.expire()
        total = 0
        for run in self.owned(tenant):
            with self._lock:
                ids = list(run.checkpoints)
            total += sum(self._bytes(run, cid) for cid in ids)
        return total

    def check_room(self, tenant: str, run_id: str, kind: str, name: str, cap_gib: float) -> None:
        """Refuses a save of `<kind>/<name>` in run `run_id` that would take `tenant` over
        `cap_gib` GiB of checkpoints (0: no cap). The new checkpoint is expected to be as large
        as the run's newest of that kind (nothing, for its first); one it replaces is freed."""
        if cap_gib <= 0:
            return
        check_checkpoint_name(name)
        used = self.tenant_bytes(tenant)
        run = self.get(tenant, run_id)
        with self._lock:
            same_kind = [
                (e.created, c) for c, e in run.checkpoints.items() if c.startswith(f"{kind}/")
            ]
            replaced = f"{kind}/{name}" in run.checkpoints
        expected = self._bytes(run, max(same_kind)[1]) if same_kind else 0
        if replaced:
            expected -= self._bytes(run, f"{kind}/{name}")
        if used + expected <= cap_gib * GIB:
            return
        raise InvalidRequestError(
            f"save of {kind} checkpoint {name!r} refused: tenant {tenant!r} has {_amount(used)} "
            f"of checkpoints on this server and it would add about {_amount(expected)}, over the "
            f"cap of {cap_gib:g} GiB per tenant (--max_checkpoint_gib_per_tenant). Free space by "
            "deleting checkpoints you no longer need (RestClient.list_user_checkpoints, then "
            "delete_checkpoint_from_tinker_path) or give them a TTL "
            "(set_checkpoint_ttl_from_tinker_path); nothing was saved"
        )

    # -- internals -------------------------------------------------------------------------

    def _local(self, run: RunRecord, checkpoint_id: str) -> Path:
        return self.checkpoint_root / run_directory(run.run_id) / checkpoint_id

    def _bytes(self, run: RunRecord, checkpoint_id: str) -> int:
        """A recorded checkpoint's size on disk, measured once."""
        key = (run.run_id, checkpoint_id)
        with self._lock:
            size = self._sizes.get(key)
        if size is None:
            size = _tree_bytes(self._local(run, checkpoint_id))
            with self._lock:
                self._sizes[key] = size
        return size

    def _change(self, run: RunRecord, change: Callable[[], object]) -> None:
        """Applies `change` to `run` and writes the record (the caller holds the lock). If the
        write fails, the record in memory is left as it was, like the one on disk."""
        before = copy.deepcopy(run.checkpoints), run.last_request_time
        change()
        try:
            self._write(run)
        except BaseException:
            run.checkpoints, run.last_request_time = before
            raise

    def _write(self, run: RunRecord) -> None:
        target = self.runs_dir / f"{run_directory(run.run_id)}.json"
        write_atomically(target, json.dumps(run.to_json(), indent=2))

    def _recover(self, run: RunRecord) -> None:
        """Puts the run's checkpoint directories in step with its record after a kill: a
        checkpoint cut off between the two renames of an overwrite is put back; a half-written
        one, an old one moved aside, and a directory the record does not name (a save whose
        answer never went out, a delete cut short) are removed."""
        for kind in KINDS:
            folder = self.checkpoint_root / run_directory(run.run_id) / kind
            if not folder.is_dir():
                continue
            changed = False
            for path in sorted(folder.iterdir()):
                aside = _MOVED_ASIDE.match(path.name)
                recorded = f"{kind}/{aside['name'] if aside else path.name}" in run.checkpoints
                if aside and recorded and not (folder / aside["name"]).exists():
                    os.replace(path, folder / aside["name"])
                    logger.warning("put back checkpoint %s (an overwrite was cut off)", path)
                elif aside or _WRITING.match(path.name) or not (path.name[0] == "." or recorded):
                    logger.warning("removing %s: left by a save that did not finish", path)
                    _remove(path)
                else:
                    continue
                changed = True
            if changed:
                fsync_directory(folder)


def _read_record(path: Path) -> RunRecord | None:
    """A run record, or None (logged) when the file cannot be read: the other runs are served."""
    try:
        return RunRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        logger.error("run record %s is unreadable and its run is not served: %s", path, e)
        return None


def _drop(run: RunRecord, checkpoint_ids: list[str]) -> None:
    for cid in checkpoint_ids:
        del run.checkpoints[cid]


def _sync_tree(directory: Path, root: Path) -> int:
    """fsyncs every file and folder under `directory` and the folders above it up to `root`
    (where the renames that made it are recorded); returns its bytes."""
    total = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        fsync_directory(Path(folder))
    for parent in directory.parents[: len(directory.relative_to(root).parts)]:
        fsync_directory(parent)
    return total


def _tree_bytes(directory: Path) -> int:
    """The bytes of the files under `directory` (0 if it is gone)."""
    total = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed while we looked
                total += os.stat(os.path.join(folder, name)).st_size
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _amount(n: int) -> str:
    return f"{n / GIB:.3g} GiB ({n:,} bytes)"


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{kind}/{name}"


def as_datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


__all__ = [
    "GIB",
    "KINDS",
    "CheckpointEntry",
    "ResolvedPath",
    "RunRecord",
    "RunStore",
    "tinker_path",
]
