"""rl.console: the per-step line, and which logs reach the console and which go to files."""

from __future__ import annotations

import logging

from rl import console
from rl.loop.metrics_log import MetricsLogger


def test_step_line_shows_the_watched_numbers_in_order():
    metrics = {
        "env/reward_mean": 0.613,
        "env/accuracy": 0.72,
        "env/format": 0.4,
        "eval/accuracy": 0.9,
        "optim/kl_sample_train_v1": 0.00123,
        "optim/entropy": 0.414,
        "time/sample_s": 2.94,
        "time/train_s": 2.31,
        "time/sync_s": 0.88,
        "time/step_s": 6.12,
        "optim/clip_fraction": 0.2,  # not a watched number: file and W&B only
    }
    line = console.step_line(4, 20, metrics, eta_s=92)
    assert line == (
        "step  5/20 | reward 0.61 acc 72% fmt 40% EVAL acc 90% kl 0.0012 ent 0.41"
        " | 6.1s (sample 2.9 train 2.3 sync 0.9) | eta 1m32s"
    )
    assert console.step_line(0, None, {"train/loss": float("nan")}) == "step 1"


def test_duration():
    assert [console.duration(s) for s in (0, 59.6, 72, 3725)] == ["0s", "1m00s", "1m12s", "1h02m"]


def test_library_logs_go_to_the_file_and_own_warnings_to_the_console(tmp_path, capsys):
    ray_logger = logging.getLogger("ray")
    before = (list(ray_logger.handlers), ray_logger.propagate)
    route = console.route_logs(tmp_path, verbose=False)
    try:
        logging.getLogger("ray.worker").warning("raylet says hello")
        logging.getLogger("vllm.engine").warning("Failed to load weights")
        logging.getLogger("samplers.pool").warning("sampler actor 0 died;\nresubmitting")
        logging.getLogger("samplers.pool").info("sampler actor 0 is back")
        console.warn("step 3: dropped a rollout: timeout\ntraceback ...")
    finally:
        route.close()
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "WARNING: sampler actor 0 died;",
        "WARNING: step 3: dropped a rollout: timeout",
    ]
    assert "raylet" not in captured.err and "Failed to load" not in captured.err
    log = (tmp_path / "logs" / "driver.log").read_text()
    # Libraries keep their own levels; only where their records go changes.
    for text in ("raylet says hello", "Failed to load weights", "sampler actor 0 is back"):
        assert text in log
    assert (list(ray_logger.handlers), ray_logger.propagate) == before  # close() restored


def test_verbose_leaves_library_logs_alone(tmp_path):
    ray_logger = logging.getLogger("ray")
    before = list(ray_logger.handlers)
    route = console.route_logs(tmp_path, verbose=True)
    try:
        assert ray_logger.handlers == before
    finally:
        route.close()


def test_metrics_logger_prints_one_line_per_step_with_an_eta(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=4) as logger:
        for step in range(2):
            logger.log(step, {"train/loss": 1.0, "time/step_s": 10.0, "data/ids": [1, 2]})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "step 1/4 | loss 1.0000 | 10.0s | eta 30s",
        "step 2/4 | loss 1.0000 | 10.0s | eta 20s",
    ]
