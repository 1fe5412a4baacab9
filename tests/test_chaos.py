"""Chaos: rl.loop.train on a tiny model while a seeded schedule kills a sampler actor and the
trainer actor. The run must finish its steps in the process, with the data order of an
uninterrupted run, each step once in metrics.jsonl, and a final checkpoint that loads."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from pathlib import Path

import pytest
import ray

from rl.cli import parse_config
from rl.loop.metrics_log import read_metrics
from rl.loop.pipeline import batch_builders, builder_id
from rl.loop.run_dir import last_checkpoint
from rl.loop.train import Config, build_datasets, main
from samplers.config import SamplerConfig
from trainers import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 6


def _steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being written
            steps.append(json.loads(line)["step"])
    return steps


def _wait_for_step(run_dir: Path, step: int, runner: threading.Thread) -> None:
    deadline = time.monotonic() + 300
    while step not in _steps_logged(run_dir) and runner.is_alive():
        assert time.monotonic() < deadline, f"step {step} never logged"
        time.sleep(0.05)


@pytest.mark.slow
def test_rl_train_survives_sampler_and_trainer_deaths(ray_local, tiny_model, tmp_path, monkeypatch):
    from rl import ServiceClient

    monkeypatch.syspath_prepend(str(ROOT))  # for env=examples.custom_env:...
    schedule = random.Random(0)
    # Saves after steps 1, 3, 5 (save_every=2); the trainer dies after an unsaved step, so
    # steps are lost and redone; the sampler dies after any earlier step.
    trainer_after = schedule.choice([2, 4])
    sampler_after = schedule.randrange(0, trainer_after)
    run_dir = tmp_path / "run"
    args = {
        "base_model": tiny_model,
        "env": "examples.custom_env:build_datasets",
        "env_args": "num_test=4",
        "num_steps": NUM_STEPS,
        "groups_per_batch": 2,
        "group_size": 2,
        "max_tokens": 4,
        "rank": 4,
        "learning_rate": 1e-2,
        "remove_constant_groups": False,
        "dynamic_sampling_rounds": 0,  # the same groups on every replay of a step
        "eval_every": 0,
        "save_every": 2,
        "log_samples": 0,
        "sampler.sync_mode": "merged",
        "log_dir": str(run_dir),
    }
    argv = [f"{k}={v}" for k, v in args.items()]
    service = ServiceClient(
        trainer_config=TrainerConfig(
            dtype="float32", num_threads=1, num_cpus=0.1, checkpoint_dir=str(tmp_path / "ckpt")
        ),
        sampler_config=SamplerConfig(engine="torch", num_actors=2, num_cpus_per_actor=0.05),
    )
    failures: list[BaseException] = []

    def run() -> None:
        try:
            main(argv, service=service)
        except BaseException as error:  # reported by the assertion below
            failures.append(error)

    runner = threading.Thread(target=run)
    try:
        runner.start()
        _wait_for_step(run_dir, sampler_after, runner)
        (pool,) = [p for key, p in service.pools.started().items() if "::merged::" in key]
        ray.kill(pool.actor_handles()[0], no_restart=False)
        _wait_for_step(run_dir, trainer_after, runner)
        (host,) = service.hosts.values()
        ray.kill(host.handle)
        runner.join(timeout=600)
        assert not runner.is_alive() and not failures, failures
        print(f"trainer restart + restore: {host.restart_seconds}")

        steps = _steps_logged(run_dir)
        assert steps == list(range(NUM_STEPS))  # each step once, lost ones redone
        assert host.generation == 1  # the trainer really was restarted
        records = [r for r in read_metrics(run_dir) if "data/problem_ids" in r]
        from transformers import AutoTokenizer

        from envs.chat import ChatRenderer

        config = parse_config(Config, argv)
        train, _ = build_datasets(config, ChatRenderer(AutoTokenizer.from_pretrained(tiny_model)))
        expected = [
            [builder_id(b) for b in batch_builders(train, step)] for step in range(NUM_STEPS)
        ]
        assert [r["data/problem_ids"] for r in records] == expected
        last = last_checkpoint(run_dir)
        assert last is not None and last.step == NUM_STEPS
        resumed = service.create_training_client_from_state_with_optimizer(last.state_path)
        assert resumed.get_info().lora_rank == 4
    finally:
        runner.join(timeout=60)
        service.close()


@pytest.mark.slow
def test_rl_sft_survives_a_trainer_death(ray_local, tiny_model, tmp_path):
    from test_sft import write_chat_data

    from rl import ServiceClient
    from rl.loop.sft import SFTConfig
    from rl.loop.sft import main as sft_main

    data = write_chat_data(tmp_path / "train.jsonl", 48, 0)
    service = ServiceClient(
        trainer_config=TrainerConfig(
            dtype="float32", num_threads=1, num_cpus=0.1, checkpoint_dir=str(tmp_path / "ckpt")
        )
    )

    def config(log_dir: Path) -> SFTConfig:
        return SFTConfig(
            base_model=tiny_model,
            data=data,
            log_dir=str(log_dir),
            rank=4,
            batch_size=8,
            num_epochs=10,  # 6 batches an epoch
            max_steps=60,
            save_every=4,
            max_length=96,
            trainer=TrainerConfig(dtype="float32"),
        )

    def batches(log_dir: Path) -> list[tuple[int, list[int]]]:
        records = read_metrics(log_dir)
        return [(r["step"], r["data/batch_indices"]) for r in records if "train/loss" in r]

    failures: list[BaseException] = []

    def run() -> None:
        try:
            sft_main(config(tmp_path / "run"), service=service)
        except BaseException as error:
            failures.append(error)

    runner = threading.Thread(target=run)
    try:
        sft_main(config(tmp_path / "reference"), service=service)  # uninterrupted
        runner.start()
        _wait_for_step(tmp_path / "run", 5, runner)  # saved at 4: later steps are lost
        (host,) = service.hosts.values()
        ray.kill(host.handle)
        runner.join(timeout=600)
        assert not runner.is_alive() and not failures, failures
        assert host.generation == 1
        assert batches(tmp_path / "run") == batches(tmp_path / "reference")
        assert [step for step, _ in batches(tmp_path / "run")] == list(range(60))
        last = last_checkpoint(tmp_path / "run")
        assert last is not None and last.step == 60
        service.create_training_client_from_state_with_optimizer(last.state_path)
    finally:
        runner.join(timeout=60)
        service.close()
