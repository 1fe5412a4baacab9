"""Checkpoint records and resuming (rl.loop.run_dir, rl.loop.sft): a run killed with `kill -9`
continues from its last checkpoint, with the same data order and losses as a run that was
never interrupted, and no checkpoint or record is corrupted on the way."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rl.checkpoint_format import read_checkpoint
from rl.cli import build_config
from rl.errors import CheckpointError
from rl.loop.metrics_log import read_metrics
from rl.loop.run_dir import (
    CheckpointRecord,
    append_checkpoint,
    last_checkpoint,
    load_checkpoints,
    rng_from_json,
    rng_state_to_json,
    start_run,
)
from rl.loop.sft import SFTConfig, main

ROOT = Path(__file__).resolve().parents[1]


def write_chat_data(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            messages = [
                {"role": "user", "content": f"What is {a} times {b}?"},
                {"role": "assistant", "content": f"{a} times {b} is {a * b}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def record(step: int) -> CheckpointRecord:
    return CheckpointRecord(name=f"s{step}", step=step, state_path=f"/x/s{step}", loop_state={})


# -- records and run config (no model) ---------------------------------------------------------


def test_a_cut_off_last_record_is_ignored_and_repaired(tmp_path):
    append_checkpoint(tmp_path, record(1))
    append_checkpoint(tmp_path, record(2))
    path = tmp_path / "checkpoints.jsonl"
    whole = path.read_bytes()
    # Killed mid-write: half of the third record, no newline.
    path.write_bytes(whole + record(3).model_dump_json().encode()[:40])
    assert [r.step for r in load_checkpoints(tmp_path)] == [1, 2]
    assert last_checkpoint(tmp_path).step == 2  # type: ignore[union-attr]
    # The next append cuts the fragment off instead of gluing onto it.
    fourth = record(4)
    append_checkpoint(tmp_path, fourth)
    assert path.read_bytes() == whole + (fourth.model_dump_json() + "\n").encode()
    assert [r.step for r in load_checkpoints(tmp_path)] == [1, 2, 4]
    # A whole record that only lacks its newline is kept, not cut.
    path.write_bytes(path.read_bytes() + record(5).model_dump_json().encode())
    append_checkpoint(tmp_path, record(6))
    assert [r.step for r in load_checkpoints(tmp_path)] == [1, 2, 4, 5, 6]
    # Damage before the last line is corruption, not a kill: an error.
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="line 2"):
        load_checkpoints(tmp_path)


def test_rng_state_round_trips_through_json():
    rng = random.Random(3)
    rng.random()
    state = json.loads(json.dumps(rng_state_to_json(rng)))
    expected = [rng.random() for _ in range(5)]
    assert [rng_from_json(state).random() for _ in range(1)] == expected[:1]
    restored = rng_from_json(state)
    assert [restored.random() for _ in range(5)] == expected
    with pytest.raises(CheckpointError):
        rng_from_json([3, ["x"], None])


def test_start_run_checks_the_config_of_an_existing_run(tmp_path):
    config = {"base_model": "m", "rank": 8, "data_sha256": "abc", "eval_every": 10}
    assert start_run(tmp_path, config) is None
    append_checkpoint(tmp_path, record(4))
    # Same settings (and a setting allowed to differ): resumes from the last record.
    again = start_run(tmp_path, {**config, "eval_every": 5}, may_differ=["eval_every"])
    assert again is not None and again.step == 4
    with pytest.raises(CheckpointError, match="rank: 8 -> 16"):
        start_run(tmp_path, {**config, "rank": 16})
    with pytest.raises(CheckpointError, match=r"base_model.*data_sha256"):
        start_run(tmp_path, {**config, "base_model": "other", "data_sha256": "def"})
    with pytest.raises(CheckpointError, match="holds a run already"):
        start_run(tmp_path, config, on_existing="error")
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored == config  # refusals change nothing
    assert start_run(tmp_path, {**config, "rank": 16}, on_existing="overwrite") is None
    assert json.loads((tmp_path / "config.json").read_text())["rank"] == 16
    assert load_checkpoints(tmp_path) == []


# -- resuming the SFT loop ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_chat_data(tmp_path_factory.mktemp("chat") / "train.jsonl", 24, 0)


def sft_args(tiny_model: str, data: str, log_dir: Path, steps: int, save_every: int) -> dict:
    return dict(
        base_model=tiny_model,
        data=data,
        log_dir=str(log_dir),
        rank=4,
        seed=3,
        batch_size=4,
        num_epochs=3,  # 6 batches per epoch: runs cross epoch boundaries
        max_steps=steps,
        learning_rate=3e-3,
        lr_schedule="cosine",
        save_every=save_every,
        eval_every=0,
        max_length=64,
        **{"trainer.dtype": "float32"},
    )


def train_records(log_dir: Path) -> list[dict]:
    return [r for r in read_metrics(log_dir) if "train/loss" in r]


def test_resume_after_a_crash_matches_an_uninterrupted_run(
    service, tiny_model, chat_file, tmp_path
):
    """In process: a copy of a finished run, rewound to its first checkpoint (as if it had
    crashed just after it, mid-append of the next record), reaches the same final state."""
    args = sft_args(tiny_model, chat_file, tmp_path / "a", steps=10, save_every=4)
    reference = main(build_config(SFTConfig, args), service=service)
    ref = train_records(tmp_path / "a")

    run_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a", run_dir)
    path = run_dir / "checkpoints.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 3  # after 4, 8 and 10 steps
    path.write_text(lines[0] + "\n" + lines[1][:50])
    resumed = main(build_config(SFTConfig, {**args, "log_dir": str(run_dir)}), service=service)
    assert resumed.resumed_from == 4 and resumed.final_step == reference.final_step == 10
    got = train_records(run_dir)
    assert [r["step"] for r in got] == list(range(10))
    assert [r["data/batch_indices"] for r in got] == [r["data/batch_indices"] for r in ref]
    assert [r["data/epoch"] for r in got][-1] == 1
    assert [r["train/loss"] for r in got][4:] == pytest.approx(
        [r["train/loss"] for r in ref][4:], rel=1e-4
    )
    assert [r["train/loss"] for r in resumed.history] == [r["train/loss"] for r in got][4:]
    assert [c.step for c in load_checkpoints(run_dir)] == [4, 8, 10]


def test_resume_refuses_a_changed_config(service, tiny_model, chat_file, tmp_path):
    args = sft_args(tiny_model, chat_file, tmp_path / "run", steps=2, save_every=0)
    main(build_config(SFTConfig, args), service=service)
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(CheckpointError, match="rank: 4 -> 8"):
        main(build_config(SFTConfig, {**args, "rank": 8}), service=service)
    other = write_chat_data(tmp_path / "other.jsonl", 24, 1)
    with pytest.raises(CheckpointError, match="data_sha256"):
        main(build_config(SFTConfig, {**args, "data": other}), service=service)
    assert (tmp_path / "run" / "config.json").read_text() == before


# -- kill -9 of the real command ---------------------------------------------------------------


def command(args: dict) -> list[str]:
    return [sys.executable, "-m", "rl.loop.sft", *(f"{k}={v}" for k, v in args.items())]


def stop_tree(proc: subprocess.Popen, descendants: list[psutil.Process]) -> None:
    """Kills `proc` and whatever it started that is still alive, by pid."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    for p in descendants:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except psutil.TimeoutExpired:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes(service, tiny_model, chat_file, tmp_path):
    steps, save_every = 16, 4
    args = sft_args(tiny_model, chat_file, tmp_path / "run", steps=steps, save_every=save_every)
    args.update({"trainer.num_threads": 1, "wandb_project": ""})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    records_path = tmp_path / "run" / "checkpoints.jsonl"

    proc = subprocess.Popen(
        command(args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    descendants: list[psutil.Process] = []
    try:
        deadline = time.time() + 240
        while not (records_path.exists() and records_path.read_text().count("\n") >= 1):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            descendants = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.02)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        stop_tree(proc, descendants)
    killed_at = last_checkpoint(tmp_path / "run")
    assert killed_at is not None and killed_at.step < steps, "killed too late to test resuming"

    # The uninterrupted run, meanwhile, in this process.
    main(build_config(SFTConfig, {**args, "log_dir": str(tmp_path / "ref")}), service=service)

    rerun = subprocess.run(
        command(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at step {killed_at.step}" in rerun.stdout

    got, ref = train_records(tmp_path / "run"), train_records(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(steps))
    assert [r["data/batch_indices"] for r in got] == [r["data/batch_indices"] for r in ref]
    assert [r["train/loss"] for r in got] == pytest.approx([r["train/loss"] for r in ref], rel=1e-3)

    # Every record names an intact checkpoint whose step matches, before and after the kill.
    checkpoints = load_checkpoints(tmp_path / "run")
    assert [c.step for c in checkpoints] == list(range(save_every, steps + 1, save_every))
    assert len(records_path.read_text().splitlines()) == len(checkpoints)
    for c in checkpoints:
        assert read_checkpoint(c.state_path, with_optimizer=True).meta.step == c.step
