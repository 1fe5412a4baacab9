"""What a person watching a run sees: one short line per step, a progress bar, one-line warnings.

The loops' own output is a handful of numbers per step (`step_line`); everything else a run
produces stays out of the console:

- every metric goes to `metrics.jsonl` and W&B (rl.loop.metrics_log);
- the driver's library loggers (Ray, vLLM, transformers, wandb, Python warnings) go to
  `<run_dir>/logs/driver.log` (`route_logs`);
- the actors' output (vLLM's engine config dumps, its per-sync "Failed to load weights"
  warning, Ray's worker logs) stays in the embedded Ray's session log directory
  (`ray.init(log_to_driver=False)`), which `link_ray_logs` links as `<run_dir>/logs/ray`.

`verbose=true` in either loop's config leaves all of it on the console, as before.
What the user must see (a dropped rollout, a restarted sampler, an error) still reaches the
console as one line: `warn()` for the loops' own warnings, and a console handler at WARNING
on this project's loggers (`rl`, `samplers`, `trainers`, `envs`) for the rest.

Lines are written through `tqdm.write` so they print above the progress bar rather than
through it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOGS_DIR = "logs"
DRIVER_LOG = "driver.log"
# Libraries whose logs go to the driver log file unless verbose.
LIBRARY_LOGGERS = (
    "ray",
    "vllm",
    "transformers",
    "torch",
    "peft",
    "accelerate",
    "wandb",
    "filelock",
    "urllib3",
    "py.warnings",
)
# This project's loggers: everything to the file, WARNING and above to the console too.
OWN_LOGGERS = ("rl", "samplers", "trainers", "envs")

_Format = Callable[[float], str]


def _pct(value: float) -> str:
    return f"{value:.0%}"


def _num(digits: int) -> _Format:
    return lambda value: f"{value:.{digits}f}"


def _sci(value: float) -> str:
    return f"{value:.1e}"


# (metric key, label, format) in the order they are shown; absent keys are left out.
STEP_FIELDS: tuple[tuple[str, str, _Format], ...] = (
    ("env/reward_mean", "reward", _num(2)),
    ("env/accuracy", "acc", _pct),
    ("env/format", "fmt", _pct),
    ("eval/accuracy", "EVAL acc", _pct),
    ("eval/format", "fmt", _pct),
    ("train/loss", "loss", _num(4)),
    ("eval/loss", "EVAL loss", _num(4)),
    ("optim/kl_sample_train_v1", "kl", _num(4)),
    ("optim/entropy", "ent", _num(2)),
    ("optim/lr", "lr", _sci),
)
# Phases of a step, shown as "12.3s (sample 4.1 train 6.0 sync 2.2)".
PHASES = (("time/sample_s", "sample"), ("time/train_s", "train"), ("time/sync_s", "sync"))


def step_line(
    step: int, total: int | None, metrics: Mapping[str, Any], eta_s: float | None = None
) -> str:
    """One compact line for the step's scalars, e.g.
    `step  5/20 | reward 0.61 acc 72% fmt 40% | kl 0.0012 ent 0.41 | 6.1s (sample 2.9 ...) | eta 1m32s`.
    """
    width = len(str(total)) if total else 1
    head = f"step {step + 1:>{width}}/{total}" if total else f"step {step + 1}"
    shown = []
    for key, label, fmt in STEP_FIELDS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            shown.append(f"{label} {fmt(float(value))}")
    parts = [head, " ".join(shown)] if shown else [head]
    step_s = metrics.get("time/step_s")
    if isinstance(step_s, (int, float)):
        split = " ".join(
            f"{label} {metrics[key]:.1f}"
            for key, label in PHASES
            if isinstance(metrics.get(key), (int, float))
        )
        parts.append(f"{step_s:.1f}s" + (f" ({split})" if split else ""))
    if eta_s is not None and math.isfinite(eta_s):
        parts.append(f"eta {duration(eta_s)}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """72 -> '1m12s', 3725 -> '1h02m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def echo(line: str) -> None:
    """Prints a line above any progress bar (plain print when no bar is active)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def progress_bar(total: int | None, desc: str, unit: str = "it", initial: int = 0) -> Any:
    """A tqdm bar on stdout, shown on a terminal only (a CI or Ray job log gets no bar lines);
    it disappears when closed, leaving the lines written above it."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=None,
        leave=False,
        dynamic_ncols=True,
        file=sys.stdout,
    )


def warn(message: str) -> None:
    """A warning the user must see: one line on the console (and in the driver log)."""
    first_line = message.strip().splitlines()[0] if message.strip() else message
    echo(f"WARNING: {first_line}")
    logging.getLogger("rl").info("warning shown: %s", message)


class _ConsoleHandler(logging.Handler):
    """WARNING and above from this project's loggers, as one line above the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().strip().splitlines()
            echo(f"{record.levelname}: {text[0] if text else ''}")
        except Exception:
            self.handleError(record)


@dataclass
class LogRoute:
    """Where `route_logs` sent the logs, and what it changed, so `close()` can put it back."""

    logs_dir: Path
    saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = field(
        default_factory=list
    )
    own: list[logging.Handler] = field(default_factory=list)
    transformers_quieted: bool = False
    warnings_captured: bool = False

    def close(self) -> None:
        """Restores the loggers as they were (a later run in this process routes anew)."""
        for logger, handlers, propagate, level in reversed(self.saved):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate, logger.level = propagate, level
        self.saved.clear()
        for handler in self.own:
            handler.close()
        self.own.clear()
        if self.transformers_quieted:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_default_handler()
            hf_logging.enable_progress_bar()
            self.transformers_quieted = False
        if self.warnings_captured:
            logging.captureWarnings(False)
            self.warnings_captured = False


def route_logs(run_dir: str | os.PathLike[str], verbose: bool = False) -> LogRoute:
    """Sends the driver's library logs to `<run_dir>/logs/driver.log` (unless `verbose`) and
    shows this project's warnings on the console in one line, until `close()`.

    Call it before the libraries start logging (before Ray starts, before the tokenizer loads).
    """
    logs = Path(run_dir) / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(logs / DRIVER_LOG)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    route = LogRoute(logs, own=[file_handler, _ConsoleHandler(logging.WARNING)])

    def take(name: str, handlers: list[logging.Handler], level: int | None) -> None:
        logger = logging.getLogger(name)
        route.saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = False
        if level is not None:
            logger.setLevel(level)

    if not verbose:
        route.transformers_quieted = _quiet_transformers()
        logging.captureWarnings(True)  # warnings.warn() -> the "py.warnings" logger -> file
        route.warnings_captured = True
        for name in LIBRARY_LOGGERS:
            take(name, [file_handler], None)
    for name in OWN_LOGGERS:
        take(name, route.own, logging.INFO)
    return route


def link_ray_logs(run_dir: str | os.PathLike[str]) -> Path | None:
    """Links `<run_dir>/logs/ray` to this process's Ray session log directory, where the
    actors' (samplers', trainer's) output is; None when Ray is not started here."""
    try:
        import ray
        from ray._private import worker  # no public API names the session's log directory

        node = getattr(worker, "_global_node", None)
        if not ray.is_initialized() or node is None:
            return None
        target = Path(node.get_logs_dir_path())
    except Exception:
        return None
    link = Path(run_dir) / LOGS_DIR / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def _quiet_transformers() -> bool:
    """transformers keeps its own stderr handler and progress bars; detach them (so its
    records reach the file). False when transformers is not installed."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return False
    hf_logging.disable_default_handler()
    hf_logging.disable_progress_bar()
    return True


def process_age_s() -> float:
    """Wall seconds since this process started (Linux /proc; 0.0 where that is unreadable):
    the clock of the start-up figures a run prints."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
