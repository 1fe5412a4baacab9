"""Per-step metrics of a training loop, to `metrics.jsonl`, the console and Weights & Biases.

One `MetricsLogger` per run. `log(step, metrics)` takes a flat dict whose keys are grouped by
prefix (`train/loss`, `optim/lr`, `env/reward_mean`, `time/sample_s`, `eval/loss`) and:

- appends `{"step": step, **metrics}` as one line to `{run_dir}/metrics.jsonl` (every
  JSON-serialisable value, lists included, e.g. `data/batch_indices`);
- prints one short line of the few numbers a person watches (`rl.console.step_line`: step/total,
  reward, accuracy, eval, KL, entropy, seconds per phase, time left) above a tqdm bar over the
  run's steps (the bar is shown on a terminal only, so a Ray job log or a CI log gets the lines
  alone); the rest stays in the file and W&B;
- sends the scalars to W&B when `wandb_project` is set (`WANDB_MODE=offline` writes a local run
  under `{run_dir}/wandb/` that `wandb sync` uploads later).

Resuming: a loop that restarts from a checkpoint redoes the steps after it, so the logger is
told `start_step` and drops the records of steps >= start_step from metrics.jsonl first; the
file then holds exactly one pass over every step. The W&B run keeps its id across restarts
(stored in `{run_dir}/wandb_id.txt`), and its x axis is the logged `step` metric rather than
W&B's own counter, so redone steps are kept rather than dropped as out of order.

`log_samples(step, rows)` records sample completions: rows go to `samples.jsonl` and, as a
`wandb.Table`, to W&B.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rl.console import echo, progress_bar, step_line
from rl.errors import InvalidRequestError

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
WANDB_ID_FILE = "wandb_id.txt"


class MetricsLogger:
    """Logs one dict of metrics per step; see the module docstring for where they go."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        wandb_project: str = "",
        wandb_name: str = "",
        config: Mapping[str, Any] | None = None,
        console: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        _drop_records_from(self.metrics_path, start_step)
        self._file = open(self.metrics_path, "a")  # noqa: SIM115 (closed by close())
        self._console = console
        self.total_steps, self.start_step = total_steps, start_step
        self._step_seconds: list[float] = []  # this session's step durations, for the ETA
        self._last_log = time.perf_counter()
        self._bar: Any = None
        if console:
            self._bar = progress_bar(total_steps, "steps", unit="step", initial=start_step)
        self._wandb_run: Any = None
        if wandb_project:
            self._wandb_run = _start_wandb(
                self.run_dir, wandb_project, wandb_name or self.run_dir.resolve().name, config
            )

    @property
    def wandb_run(self) -> Any:
        """The W&B run, or None when W&B is off."""
        return self._wandb_run

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records the metrics of `step`; every key needs a `group/` prefix."""
        bad = [key for key in metrics if "/" not in key.strip("/")]
        if bad:
            raise InvalidRequestError(
                f"metric keys need a group prefix such as 'train/' or 'env/': {bad}"
            )
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and _is_scalar(v)}
        if self._console:
            line = step_line(step, self.total_steps, scalars, self._eta(step, scalars))
            echo(line)
            if self._bar is not None and not self._bar.disable:
                self._bar.n = min(step + 1, self._bar.total or step + 1)
                self._bar.refresh()
        if self._wandb_run is not None:
            self._wandb_run.log({**scalars, "step": int(step)})

    def _eta(self, step: int, scalars: Mapping[str, Any]) -> float | None:
        """Seconds left: the mean step time of this session times the steps still to run."""
        now = time.perf_counter()
        seconds = scalars.get("time/step_s")
        self._step_seconds.append(
            float(seconds) if isinstance(seconds, (int, float)) else now - self._last_log
        )
        self._last_log = now
        if self.total_steps is None:
            return None
        mean = sum(self._step_seconds) / len(self._step_seconds)
        return mean * max(self.total_steps - (step + 1), 0)

    def log_samples(
        self, step: int, rows: Sequence[Mapping[str, Any]], key: str = "samples"
    ) -> Any:
        """Records sample completions (e.g. prompt, completion, reward); returns a wandb.Table.

        Columns are the rows' keys in order of first appearance; a missing value is None.
        """
        import wandb

        columns: list[str | int] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        data = [[_plain(row.get(str(c))) for c in columns] for row in rows]
        with open(self.run_dir / SAMPLES_FILE, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": int(step), "key": key, **_plain(dict(row))}) + "\n")
        table = wandb.Table(columns=columns, data=data)
        if self._wandb_run is not None:
            self._wandb_run.log({key: table, "step": int(step)})
        return table

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._file.closed:
            self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def timed(metrics: dict[str, Any], key: str) -> Iterator[None]:
    """Adds the seconds the block took to `metrics[key]` (e.g. `time/sample_s`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of `{run_dir}/metrics.jsonl`; a line cut short by a kill is skipped."""
    return _read_records(Path(run_dir) / METRICS_FILE)


# ---------------------------------------------------------------------------------------------


def _start_wandb(run_dir: Path, project: str, name: str, config: Mapping[str, Any] | None) -> Any:
    import wandb

    id_path = run_dir / WANDB_ID_FILE
    if id_path.is_file():
        run_id = id_path.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_path.write_text(run_id + "\n")
    run = wandb.init(
        project=project,
        name=name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=dict(config or {}),
        # Our own console output stays ours; W&B keeps the metrics.
        settings=wandb.Settings(console="off"),
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _drop_records_from(path: Path, start_step: int) -> None:
    """Rewrites `path` keeping only records of steps < start_step (atomically)."""
    if not path.exists():
        return
    kept = [r for r in _read_records(path) if int(r.get("step", 0)) < start_step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # the process was killed mid-write
            raise InvalidRequestError(f"{path}, line {i + 1}: not a JSON record") from None
    return records


def _plain(value: Any) -> Any:
    """numpy / torch scalars and arrays -> Python numbers and lists, so json and W&B take them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float))  # bool included
