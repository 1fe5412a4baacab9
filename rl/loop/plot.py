"""Curves of one or more runs, drawn from their `metrics.jsonl`:

    python -m rl.loop.plot RUN_DIR [RUN_DIR ...] [--out FILE.png]   # default: RUN_DIR/curves.png

The panels a person looks at, each drawn only when some run logged its keys: reward and
accuracy / format rate per step with the held-out evals marked (the baseline at step 0),
loss for SFT, the sampler-trainer KL, the entropy, and the seconds per step stacked by
phase. Several runs are overlaid, one colour each, with a legend.

The x axis is the number of optimizer steps taken: a training step's metrics are drawn at the
weights it sampled with (record `step`), an eval at the weights it measured (`eval/step` where
the loop logs it, since rl.loop.train logs an eval with the step that ended just before it).
`rl.loop.train` and `rl.loop.sft` call `write_curves` at each eval and at the end of a run.

matplotlib is used through its object API (`Figure` + the Agg canvas), not pyplot, so drawing
from a loop's worker thread touches no global state and needs no display.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl.loop.metrics_log import read_metrics

CURVES_FILE = "curves.png"
# Seconds per step, split by phase (bottom to top); "other" is the rest of `time/step_s`.
PHASES = (("time/sample_s", "sample"), ("time/train_s", "train"), ("time/sync_s", "sync"))
PHASE_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#BBBBBB")
RUN_HATCHES = ("", "//", "..", "xx", "\\\\")


@dataclass
class Series:
    """One metric of one run: x = optimizer steps taken, y = the value."""

    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def add(self, x: float, y: Any) -> None:
        if isinstance(y, (int, float)) and math.isfinite(y):
            self.x.append(float(x))
            self.y.append(float(y))


@dataclass
class RunCurves:
    """The curves of one run: per-step series, eval series, and the time split."""

    name: str
    steps: dict[str, Series] = field(default_factory=dict)
    evals: dict[str, Series] = field(default_factory=dict)
    phases: dict[str, Series] = field(default_factory=dict)

    def step(self, key: str) -> Series:
        return self.steps.get(key, Series())

    def eval(self, key: str) -> Series:
        return self.evals.get(key, Series())


def load_run(run_dir: str | os.PathLike[str], name: str | None = None) -> RunCurves:
    """Reads `run_dir/metrics.jsonl` into curves; the eval of a record goes to `eval/step`."""
    records = read_metrics(run_dir)
    run = RunCurves(name or Path(run_dir).resolve().name)
    for record in sorted(records, key=lambda r: int(r.get("step", 0))):
        step = int(record.get("step", 0))
        eval_x = record.get("eval/step", step)
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # lists (problem ids) and flags are not curves
            if key.startswith("eval/"):
                run.evals.setdefault(key, Series()).add(eval_x, value)
            elif key.startswith("baseline/"):  # rl.loop.train's eval before the first step
                name_ = "eval/" + key.split("/", 1)[1]
                run.evals.setdefault(name_, Series()).add(record.get("baseline/step", 0), value)
            else:
                run.steps.setdefault(key, Series()).add(step, value)
        step_s = record.get("time/step_s")
        if isinstance(step_s, (int, float)):
            known = 0.0
            for key, label in PHASES:
                value = record.get(key, 0.0)
                value = value if isinstance(value, (int, float)) else 0.0
                run.phases.setdefault(label, Series()).add(step, value)
                known += value
            run.phases.setdefault("other", Series()).add(step, max(step_s - known, 0.0))
    for series in run.evals.values():  # the baseline came after step 0's record: sort by x
        pairs = sorted(zip(series.x, series.y, strict=True))
        series.x, series.y = [p[0] for p in pairs], [p[1] for p in pairs]
    return run


@dataclass(frozen=True)
class Panel:
    """A plot of per-step metrics (lines) and eval metrics (markers joined by a thin line)."""

    title: str
    lines: tuple[tuple[str, str], ...] = ()  # (key, label), drawn solid then dashed, dotted
    evals: tuple[tuple[str, str], ...] = ()
    percent: bool = False

    def keys(self) -> list[str]:
        return [k for k, _ in self.lines] + [k for k, _ in self.evals]


PANELS = (
    Panel(
        "accuracy and format",
        lines=(("env/accuracy", "train acc"), ("env/format", "train format")),
        evals=(("eval/accuracy", "held-out acc"), ("eval/format", "held-out format")),
        percent=True,
    ),
    Panel("reward (mean per step)", lines=(("env/reward_mean", "train"),)),
    Panel("loss (per token)", lines=(("train/loss", "train"),), evals=(("eval/loss", "held-out"),)),
    Panel(
        "sampler-trainer KL",
        lines=(("optim/kl_sample_train_v1", "v1: mean(q - p)"), ("optim/kl_sample_train_v2", "v2")),
    ),
    Panel("entropy (nats per sampled token)", lines=(("optim/entropy", "train"),)),
    Panel("learning rate", lines=(("optim/lr", "lr"),)),
)
LINE_STYLES = ("-", "--", ":")
EVAL_MARKERS = ("o", "s", "^")


def write_curves(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Draws the runs' curves into the PNG `out` (written atomically); returns its path."""
    fig = figure(run_dirs)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def figure(run_dirs: Sequence[str | os.PathLike[str]]) -> Any:
    """The matplotlib Figure of the runs' curves (one panel per metric group that was logged)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [load_run(d, name) for d, name in zip(run_dirs, _names(run_dirs), strict=True)]
    panels = [p for p in PANELS if any(_has(run, p) for run in runs)]
    timed = any(run.phases for run in runs)
    count = len(panels) + int(timed)
    if count == 0:
        raise ValueError(f"no metrics to plot in {', '.join(map(str, run_dirs))}")
    columns = 3 if count >= 5 else min(count, 2)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(5.2 * columns, 3.4 * rows), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, panel in zip(axes, panels, strict=False):
        _draw_panel(ax, panel, runs, colors)
    if timed:
        _draw_time(axes[len(panels)], runs)
    for ax in axes[count:]:
        ax.set_visible(False)
    title = "  vs  ".join(run.name for run in runs)
    fig.suptitle(title, fontsize=11)
    return fig


def _names(run_dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Run labels: the directory names, or the paths where two names coincide."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) < len(names):
        return [str(d) for d in run_dirs]
    return names


def _has(run: RunCurves, panel: Panel) -> bool:
    return any(run.step(k).x for k, _ in panel.lines) or any(run.eval(k).x for k, _ in panel.evals)


def _draw_panel(ax: Any, panel: Panel, runs: list[RunCurves], colors: list[str]) -> None:
    several = len(runs) > 1
    for run, color in zip(runs, colors, strict=True):
        prefix = f"{run.name}: " if several else ""
        for (key, label), style in zip(panel.lines, LINE_STYLES, strict=False):
            series = run.step(key)
            if series.x:
                ax.plot(series.x, series.y, style, color=color, lw=1.4, label=prefix + label)
        for (key, label), marker in zip(panel.evals, EVAL_MARKERS, strict=False):
            series = run.eval(key)
            if series.x:
                ax.plot(
                    series.x, series.y, marker=marker, ms=6, lw=0.8, color=color,
                    markerfacecolor="white" if marker != "o" else color,
                    label=prefix + label,
                )  # fmt: skip
    ax.set_title(panel.title, fontsize=10)
    _style_x(ax)
    ax.grid(alpha=0.3)
    if panel.percent:
        ax.set_ylim(-0.03, 1.03)
        ax.yaxis.set_major_formatter(_percent_ticks())
    ax.legend(fontsize=7, loc="best")


def _draw_time(ax: Any, runs: list[RunCurves]) -> None:
    """Stacked bars of seconds per step by phase; runs side by side, told apart by hatching."""
    width = 0.8 / len(runs)
    labelled: set[str] = set()
    for r, run in enumerate(runs):
        offset = (r - (len(runs) - 1) / 2) * width
        bottom: dict[float, float] = {}
        for (label, series), color in zip(_ordered_phases(run), PHASE_COLORS, strict=False):
            xs = [x + offset for x in series.x]
            base = [bottom.get(x, 0.0) for x in series.x]
            ax.bar(
                xs, series.y, width=width, bottom=base, color=color, edgecolor="white",
                hatch=RUN_HATCHES[r % len(RUN_HATCHES)], lw=0.3,
                label=label if label not in labelled else None,
            )  # fmt: skip
            labelled.add(label)
            for x, y in zip(series.x, series.y, strict=True):
                bottom[x] = bottom.get(x, 0.0) + y
    ax.set_title("seconds per step, by phase", fontsize=10)
    if len(runs) > 1:
        ax.set_title(
            "seconds per step, by phase (" + ", ".join(
                f"{run.name}: {RUN_HATCHES[r % len(RUN_HATCHES)] or 'plain'}"
                for r, run in enumerate(runs)
            ) + ")",
            fontsize=9,
        )  # fmt: skip
    _style_x(ax)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best")


def _style_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimizer steps", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)


def _ordered_phases(run: RunCurves) -> list[tuple[str, Series]]:
    order = [label for _, label in PHASES] + ["other"]
    return [(label, run.phases[label]) for label in order if label in run.phases]


def _percent_ticks() -> Any:
    """Axis ticks 0.5 -> '50%'."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _pos: f"{value:.0%}")


def curves_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CURVES_FILE


def write_run_curves(run_dir: str | os.PathLike[str]) -> Path | None:
    """`run_dir/curves.png` of a run so far, for the loops: a plot that fails is a one-line
    warning (None), never the end of a training run."""
    from rl.console import warn

    path = curves_path(run_dir)
    try:
        return write_curves([run_dir], path)
    except Exception as error:
        warn(f"could not draw {path}: {error!r}")
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rl.loop.plot` / `engineroom-plot`; prints the PNG's path."""
    parser = argparse.ArgumentParser(
        prog="python -m rl.loop.plot", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", help="PNG to write (default: the first RUN_DIR/curves.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    missing = [d for d in args.run_dirs if not (Path(d) / "metrics.jsonl").is_file()]
    if missing:
        print(f"rl.loop.plot: error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out or curves_path(args.run_dirs[0])
    try:
        path = write_curves(args.run_dirs, out)
    except ValueError as error:
        print(f"rl.loop.plot: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
