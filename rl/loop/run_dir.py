"""A run directory's checkpoint records, its config, and what a training loop needs to resume.

    {run_dir}/config.json        the run's config, written when the run starts
    {run_dir}/checkpoints.jsonl  one CheckpointRecord per line, appended after each save
    {run_dir}/checkpoints/       where the trainer writes the states (TrainerConfig.checkpoint_dir)

As tinker-cookbook's `checkpoint_utils`: a save is `TrainingClient.save_state` (written
atomically by the trainer) and then a record appended to checkpoints.jsonl and fsync'd, so a
record only ever names a complete state. The loops append it after the metrics of the steps
it covers are logged, so a resumed run's metrics.jsonl has every step. On restart, `start_run` checks that the new config
is compatible with config.json and returns the last record: the loop reloads weights and
optimizer with `ServiceClient.create_training_client_from_state_with_optimizer(state_path)` and
its own position from `loop_state` (data position, serialised RNG state, anything else).

A process killed while appending leaves a cut-off last line: readers skip it and the next
append cuts it off first, so it can never corrupt the records before it or after it.
Nothing here knows about a particular loop; SFT and RL share it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rl.console import warn
from rl.durable import write_atomically
from rl.errors import CheckpointError, InvalidRequestError, TrainerRestartedError

if TYPE_CHECKING:
    from rl.client.training import TrainingClient

CONFIG_FILE = "config.json"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"

OnExisting = Literal["resume", "overwrite", "error"]


class CheckpointRecord(BaseModel):
    """One saved checkpoint of a run."""

    model_config = ConfigDict(extra="forbid")

    name: str
    step: int  # optimizer steps completed when it was saved = the step to run next
    state_path: str  # save_state: weights + optimizer (create_*_from_state_with_optimizer)
    sampler_path: str | None = None  # save_weights_for_sampler, if the loop saved one
    loop_state: dict[str, Any] = Field(default_factory=dict)
    time: float = Field(default_factory=time.time)


def checkpoint_root(run_dir: str | os.PathLike[str]) -> Path:
    """The directory a run's trainer saves into (pass it as TrainerConfig.checkpoint_dir)."""
    return Path(run_dir) / CHECKPOINT_SUBDIR


# -- the run's config --------------------------------------------------------------------------


def start_run(
    run_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    *,
    on_existing: OnExisting = "resume",
    may_differ: Iterable[str] = (),
) -> CheckpointRecord | None:
    """Prepares `run_dir` for a run with `config`; returns the checkpoint to resume from.

    A new run dir gets `config.json`. An existing one is, by `on_existing`:
    "resume": checked against `config` (every key outside `may_differ` must be equal) and its
    last checkpoint returned (None if it has none yet); "overwrite": cleared of this module's
    files and the logs' and started afresh; "error": refused.
    """
    root = Path(run_dir)
    config_path = root / CONFIG_FILE
    if on_existing not in ("resume", "overwrite", "error"):
        raise InvalidRequestError(f"on_existing={on_existing!r}: expected resume|overwrite|error")
    if config_path.exists():
        if on_existing == "error":
            raise CheckpointError(
                f"run dir {str(root)!r} holds a run already; choose another log dir, or "
                "on_existing=resume / on_existing=overwrite"
            )
        if on_existing == "overwrite":
            _clear_run(root)
    if config_path.exists():
        check_run_config(root, config, may_differ=may_differ)
        return last_checkpoint(root)
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    write_atomically(config_path, text, mode=0o644)
    return None


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"run dir {str(run_dir)!r} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return stored


def check_run_config(
    run_dir: str | os.PathLike[str], config: Mapping[str, Any], *, may_differ: Iterable[str] = ()
) -> None:
    """Raises CheckpointError listing every key (outside `may_differ`) whose value changed."""
    stored = read_run_config(run_dir)
    # Round-trip through JSON so tuples, paths, etc. compare as they were stored.
    current = json.loads(json.dumps(dict(config), default=str))
    skip = set(may_differ)
    changed = [
        f"{key}: {stored.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}"
        for key in sorted(set(stored) | set(current))
        if key not in skip and stored.get(key) != current.get(key)
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume the run in {str(run_dir)!r}: its config differs in "
            + "; ".join(changed)
            + " (use the same settings, another log dir, or on_existing=overwrite)"
        )


# -- checkpoint records ------------------------------------------------------------------------


def save_state(
    client: TrainingClient, name: str, step: int, loop_state: Mapping[str, Any]
) -> CheckpointRecord:
    """Saves the client's state (weights, optimizer, step) and returns its record, which the
    loop appends (`append_checkpoint`) once it has logged the metrics of the steps before it:
    a run resumed from a record then finds every earlier step in metrics.jsonl. Blocks until
    the state is on disk."""
    path = client.save_state(name, overwrite=True).result().path
    return CheckpointRecord(name=name, step=step, state_path=path, loop_state=dict(loop_state))


def append_checkpoint(run_dir: str | os.PathLike[str], record: CheckpointRecord) -> None:
    """Appends `record` to checkpoints.jsonl and fsyncs it."""
    path = Path(run_dir) / CHECKPOINTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    with open(path, "ab") as f:
        f.write((record.model_dump_json() + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def load_checkpoints(run_dir: str | os.PathLike[str]) -> list[CheckpointRecord]:
    """Every record of the run, oldest first. A last line that does not parse (the process was
    killed mid-write) is ignored; any earlier bad line is corruption and raises."""
    path = Path(run_dir) / CHECKPOINTS_FILE
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(CheckpointRecord.model_validate_json(line))
        except ValidationError as e:
            if i == last:
                continue
            raise CheckpointError(f"{path}, line {i + 1} is not a checkpoint record: {e}") from None
    return records


def last_checkpoint(run_dir: str | os.PathLike[str]) -> CheckpointRecord | None:
    """The newest complete record, or None if the run has saved nothing yet."""
    records = load_checkpoints(run_dir)
    return records[-1] if records else None


def resume_after_restart(
    client: TrainingClient, run_dir: str | os.PathLike[str], error: TrainerRestartedError
) -> CheckpointRecord | None:
    """After the trainer died and steps were lost (`error`): loads the run's last checkpoint
    into `client` (weights, optimizer, step) and returns its record, from which the loop takes
    its own position, as a new process would resume; None: nothing was saved, start over.

    The client was restored to its last save by the restart already; loading the record's state
    also covers a save that finished on the trainer but died before its record was written."""
    record = last_checkpoint(run_dir)
    if record is not None:
        client.load_state_with_optimizer(record.state_path).result()
    warn(f"{error} Resuming at step {record.step if record is not None else 0}.")
    return record


# -- RNG state ---------------------------------------------------------------------------------


def rng_state_to_json(rng: random.Random) -> list[Any]:
    """`rng.getstate()` as JSON-able lists."""
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def rng_from_json(state: Any) -> random.Random:
    """A `random.Random` in the state `rng_state_to_json` recorded."""
    try:
        version, internal, gauss_next = state
        rng = random.Random()
        rng.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad RNG state in checkpoint record: {e}") from None
    return rng


# ---------------------------------------------------------------------------------------------


def _repair_tail(path: Path) -> None:
    """Ends the file with a newline: a cut-off last line is removed, a whole one terminated.

    Otherwise the next record would be glued onto the cut-off line and be unreadable too.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        CheckpointRecord.model_validate_json(data[start:])
    except ValidationError:
        with open(path, "r+b") as f:
            f.truncate(start)
            f.flush()
            os.fsync(f.fileno())
        return
    with open(path, "ab") as f:
        f.write(b"\n")


# Files a run dir holds that "overwrite" removes (the loggers' included); anything else stays.
_RUN_FILES = (CONFIG_FILE, CHECKPOINTS_FILE, "metrics.jsonl", "samples.jsonl", "wandb_id.txt")


def _clear_run(root: Path) -> None:
    for name in _RUN_FILES:
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(root / CHECKPOINT_SUBDIR, ignore_errors=True)
