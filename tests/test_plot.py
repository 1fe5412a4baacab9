"""rl.loop.plot on hand-written metrics.jsonl files (an RL run, an SFT run, two runs overlaid), and
a tiny rl.loop.train run that leaves its curves.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.loop import plot
from rl.loop.metrics_log import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_rl_run(run_dir: Path, steps: int = 6, slow: float = 1.0) -> None:
    """An rl.loop.train-shaped metrics.jsonl: baseline in step 0's record, evals after steps 3, 6."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(steps):
            record = {
                "step": step,
                "env/reward_mean": -0.5 + 0.2 * step,
                "env/accuracy": 0.1 * step,
                "env/format": 0.15 * step,
                "optim/kl_sample_train_v1": 1e-3,
                "optim/entropy": 1.0 / (step + 1),
                "time/sample_s": 2.0 * slow,
                "time/train_s": 3.0 * slow,
                "time/sync_s": 1.0 * slow,
                "time/step_s": 6.5 * slow,
                "data/problem_ids": [1, 2, 3],  # lists are skipped
            }
            if step == 0:
                record |= {"baseline/accuracy": 0.2, "baseline/format": 0.0, "baseline/step": 0.0}
            if (step + 1) % 3 == 0:
                record |= {"eval/accuracy": 0.3 * (step + 1) / 3, "eval/step": step + 1.0}
            f.write(json.dumps(record) + "\n")


def write_sft_run(run_dir: Path) -> None:
    """An rl.loop.sft-shaped metrics.jsonl: eval before steps 0 and 2, the final eval at step 4."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [
        {"step": s, "train/loss": 2.0 - 0.3 * s, "optim/lr": 1e-4, "time/step_s": 1.5}
        for s in range(4)
    ]
    records[0]["eval/loss"] = 2.1
    records[2]["eval/loss"] = 1.6
    records.append({"step": 4, "eval/loss": 1.2})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_visible()]


def test_rl_run_curves_place_evals_at_the_weights_they_measured(tmp_path):
    write_rl_run(tmp_path)
    run = plot.load_run(tmp_path)
    # The baseline is the eval after 0 steps; the eval logged with step 2 measured 3 steps.
    assert run.eval("eval/accuracy").x == [0.0, 3.0, 6.0]
    assert run.eval("eval/accuracy").y == pytest.approx([0.2, 0.3, 0.6])
    assert run.eval("eval/format").x == [0.0]
    assert run.step("env/accuracy").x == [0, 1, 2, 3, 4, 5]
    assert "data/problem_ids" not in run.steps
    # "other" is the part of time/step_s that no phase accounts for.
    assert run.phases["other"].y == pytest.approx([0.5] * 6)
    assert titles(plot.figure([tmp_path])) == [
        "accuracy and format",
        "reward (mean per step)",
        "sampler-trainer KL",
        "entropy (nats per sampled token)",
        "seconds per step, by phase",
    ]


def test_sft_run_gets_loss_panels_only(tmp_path):
    write_sft_run(tmp_path)
    run = plot.load_run(tmp_path)
    assert run.eval("eval/loss").x == [0.0, 2.0, 4.0]
    assert titles(plot.figure([tmp_path])) == [
        "loss (per token)",
        "learning rate",
        "seconds per step, by phase",
    ]


def test_cli_overlays_runs_with_a_legend(tmp_path, capsys):
    write_rl_run(tmp_path / "a")
    write_rl_run(tmp_path / "b", slow=2.0)
    out = tmp_path / "both.png"
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    fig = plot.figure([tmp_path / "a", tmp_path / "b"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "a: held-out acc" in labels and "b: train acc" in labels
    # The default output is the first run's curves.png.
    assert plot.main([str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "data/ids": [1]}) + "\n")
    assert plot.main([str(tmp_path)]) == 2
    assert "no metrics to plot" in capsys.readouterr().err


def test_tiny_rl_train_run_writes_curves_and_keeps_logs_in_files(
    torch_service, tiny_model, tmp_path, capsys
):
    from rl.loop.train import main

    args = {
        "base_model": tiny_model,
        "env": "arithmetic",
        "env_args": "num_test=4",
        "num_steps": 2,
        "groups_per_batch": 2,
        "group_size": 4,
        "max_tokens": 4,
        "rank": 8,
        "remove_constant_groups": False,
        "eval_every": 1,
        "save_every": 0,
        "sampler.engine": "torch",
        "sampler.sync_mode": "adapter",
        "trainer.num_threads": 1,
        "log_dir": str(tmp_path),
    }
    main([f"{k}={v}" for k, v in args.items()], service=torch_service)
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    records = read_metrics(tmp_path)
    assert [r["eval/step"] for r in records] == [1.0, 2.0]
    run = plot.load_run(tmp_path)
    assert run.eval("eval/accuracy").x == [0.0, 1.0, 2.0]
    assert run.eval("eval/format").x == [0.0, 1.0, 2.0]  # arithmetic has a format check
    assert (tmp_path / "logs" / "driver.log").is_file()
    out = capsys.readouterr().out
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in step_lines] == ["step 1/2", "step 2/2"]
    assert all("eta" in line and "(sample" in line for line in step_lines)
