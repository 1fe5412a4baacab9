"""The RL loop (rl.loop.train) with tiny random models: one sync step, async off-policy steps, the
custom-env example, config errors, kill -9 and resume; one run through the real vLLM engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.cli import parse_config
from rl.errors import InvalidRequestError
from rl.loop.metrics_log import read_metrics
from rl.loop.pipeline import batch_builders, builder_id
from rl.loop.train import Config, build_datasets, main

ROOT = Path(__file__).resolve().parents[1]
CUSTOM_ENV = "examples.custom_env:build_datasets"


@pytest.fixture(autouse=True)
def repo_root_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # for env=examples.custom_env:...


def tiny_args(tiny_model: str, log_dir: Path, **overrides: object) -> list[str]:
    args = {
        "base_model": tiny_model,
        "env": CUSTOM_ENV,
        "env_args": "num_test=4",
        "num_steps": 2,
        "groups_per_batch": 3,
        "group_size": 4,
        "max_tokens": 6,
        "rank": 8,
        "learning_rate": 1e-2,
        "remove_constant_groups": False,
        "dynamic_sampling_rounds": 0,  # every step trains its own groups, no more
        "eval_every": 0,
        "save_every": 0,
        "log_samples": 2,
        "sampler.engine": "torch",
        "sampler.sync_mode": "adapter",  # one shared sampler actor for every test's training client
        "trainer.num_threads": 1,
        "log_dir": str(log_dir),
        **overrides,
    }
    return [f"{key}={value}" for key, value in args.items()]


def test_one_sync_step(torch_service, tiny_model, tmp_path):
    trainer = main(tiny_args(tiny_model, tmp_path, num_steps=1), service=torch_service)
    (step,) = trainer.history
    assert step["optim/num_datums"] == 12
    assert step["env/num_trajectories"] == 12
    # Same weights, same dtype on both sides: the sampler's logprobs are the trainer's.
    assert abs(step["optim/kl_sample_train_v1"]) < 1e-3
    assert step["optim/entropy"] > 0 and step["optim/grad_norm"] > 0
    assert step["async/staleness"] == 0
    for key in ("time/sample_s", "time/train_s", "time/sync_s", "perf/sample_tokens_per_s"):
        assert step[key] > 0, key
    assert "optim/clip_fraction" in step  # ppo reports it
    # Baseline eval before the step and the final eval after it, in the logged metrics.
    (record,) = read_metrics(tmp_path)
    assert record["baseline/accuracy"] == trainer.evals[0][1]
    assert record["eval/accuracy"] == trainer.evals[-1][1]
    assert [s for s, _ in trainer.evals] == [0, 1]
    assert (tmp_path / "checkpoints.jsonl").is_file()  # the final checkpoint
    assert (tmp_path / "samples.jsonl").read_text().count("completion") == 4


def test_async_steps_sample_ahead(torch_service, tiny_model, tmp_path):
    args = tiny_args(tiny_model, tmp_path, num_steps=3, max_steps_off_policy=1, loss_fn="cispo")
    trainer = main(args, service=torch_service)
    # Batch 0 uses the initial weights; batches 1 and 2 are sampled while the step before
    # them trains, i.e. with weights one step old.
    assert [s["async/staleness"] for s in trainer.history] == [0, 1, 1]
    assert all(s["optim/num_datums"] == 12 for s in trainer.history)
    # Weights moved (lr 1e-2) between sampling and training: the gap shows up in the KL.
    assert abs(trainer.history[0]["optim/kl_sample_train_v1"]) < 1e-3
    assert trainer.history[2]["optim/kl_sample_train_v2"] > 1e-6


def test_kl_penalty_and_substeps(torch_service, tiny_model, tmp_path):
    args = tiny_args(
        tiny_model,
        tmp_path,
        num_steps=2,
        kl_penalty_coef=0.1,
        num_substeps=2,
        loss_fn="dro",
        loss_reduction="sum",
    )
    trainer = main(args, service=torch_service)
    first, second = trainer.history
    assert abs(first["kl/sampler_base"]) < 1e-3  # step 0 samples the base weights themselves
    assert abs(second["kl/sampler_base"]) > 1e-6


def test_lr_schedule_and_dynamic_sampling_in_a_run(torch_service, tiny_model, tmp_path):
    args = tiny_args(
        tiny_model,
        tmp_path,
        num_steps=2,
        lr_schedule="linear",
        remove_constant_groups=True,
        dynamic_sampling_rounds=2,
        dynamic_sampling_min_groups=3,
    )
    trainer = main(args, service=torch_service)
    assert [s["optim/lr"] for s in trainer.history] == pytest.approx([1e-2, 0.5e-2])
    for step in trainer.history:
        rounds, informative = step["dynamic/rounds"], step["train/informative_groups"]
        assert step["dynamic/sampled_groups"] == 3 * (1 + rounds)
        assert step["env/num_groups"] == 3  # env/ metrics: the step's own groups
        assert step["optim/num_datums"] == 4 * informative  # only groups with a signal train
        assert informative <= 3  # never more than groups_per_batch
        assert rounds == 2 or informative == 3  # it stops once the batch has enough


def always_one(reply: str, answer: str = "") -> float:
    return 1.0


def same_reward_datasets(renderer, batch_size: int, group_size: int, seed: int = 0):
    """Every reply scores 1: every group is constant (a run's `env=test_rl_loop:...`)."""
    from envs.problem import ProblemDataset, ProblemTask
    from examples.custom_env import make_problems

    task = ProblemTask("same", check_answer=always_one, check_format=always_one, format_coef=0)
    train = ProblemDataset(
        make_problems(10 * batch_size, seed), task, renderer, batch_size, group_size, seed
    )
    test = ProblemDataset(make_problems(2, seed + 1), task, renderer, 2, 1, shuffle=False)
    return train, test


def test_dynamic_sampling_stops_after_its_rounds(torch_service, tiny_model, tmp_path):
    args = tiny_args(
        tiny_model,
        tmp_path,
        num_steps=1,
        env="test_rl_loop:same_reward_datasets",
        env_args="",
        remove_constant_groups=True,
        dynamic_sampling_rounds=2,
    )
    (step,) = main(args, service=torch_service).history
    assert step["dynamic/rounds"] == 2  # no round found a group with a signal
    assert step["dynamic/sampled_groups"] == 9
    assert step["dynamic/added_groups"] == 0
    assert step["env/num_groups"] == 3
    assert step["optim/num_datums"] == 0  # nothing to train: no optimizer step


def test_custom_env_example_runs(torch_service, tiny_model, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import custom_env

    overrides = tiny_args(tiny_model, tmp_path, num_steps=2)
    trainer = custom_env.main(overrides, service=torch_service)
    assert len(trainer.history) == 2
    rewards = [s["env/reward_mean"] for s in trainer.history]
    assert all(-0.1 <= r <= 1.0 for r in rewards)
    assert custom_env.word_length_score("hello", "5") == 1.0
    assert custom_env.word_length_score("hi there", "4") == 0.5
    assert custom_env.single_word(" Apple. ") == 1.0 and custom_env.single_word("two words") == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lerning_rate=1e-3"], "unknown config key 'lerning_rate'"),
        (["loss_fn=reinforce"], "loss_fn='reinforce': expected one of"),
        (["learning_rate=fast"], "learning_rate='fast': expected float"),
        (["group_size=0"], "group_size=0 must be >= 1"),
        (["env=chess"], "env='chess': expected one of"),
        (["loss_fn=dro", "clip_low=0.5"], "does not take clip_low_threshold"),
        (["loss_fn=dro"], "dro has a quadratic term: use loss_reduction=sum"),
        (["loss_fn=stable_reinforce"], "stable_reinforce has a KL term: use loss_reduction=sum"),
        (["env_args=level"], "env_args item 'level' is not key=value"),
        (["temperature=-1"], "temperature=-1.0 must be"),
        (["entropy_coef=nan"], "entropy_coef=nan must be a finite number >= 0"),
    ],
)
def test_bad_config_is_a_clear_error(argv, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        parse_config(Config, argv)


def test_unloadable_env_and_bad_env_args(torch_service, tiny_model, tmp_path):
    with pytest.raises(InvalidRequestError, match="cannot load"):
        main(tiny_args(tiny_model, tmp_path, env="no_such_module:build"), service=torch_service)
    with pytest.raises(InvalidRequestError, match="env_args"):
        main(
            tiny_args(tiny_model, tmp_path / "b", env_args="colour=3"),
            service=torch_service,
        )


def test_cli_reports_config_errors_without_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "rl.loop.train", "num_steps=often"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "error: num_steps='often': expected int" in result.stderr
    assert "Traceback" not in result.stderr


def _run_train(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, "-m", "rl.loop.train", *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: kill -9 takes its Ray with it
    )


def _run_script(script: str, timeout: float) -> None:
    """Runs `script` in a fresh Python with the repo importable; it must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_rays_processes_outlive_the_setup_threads(tiny_model, tmp_path):
    """rl.loop.train starts Ray while the datasets load in a thread: Ray's own processes (GCS,
    raylet) die with the thread that started them, so the main thread must start Ray."""
    args = [a for a in tiny_args(tiny_model, tmp_path) if not a.startswith("sampler.sync_mode")]
    script = f"""
import sys, time
from ray._private import worker
from rl.cli import parse_config
from rl.loop.train import Config, setup
run, _ = setup(parse_config(Config, {args!r}), None)
time.sleep(1)
dead = [name for name, _ in worker._global_node.dead_processes()]
run.service.close()
print("dead:", dead)
sys.exit(3 if dead else 0)
"""
    _run_script(script, timeout=300)


def test_the_driver_reaches_ray_without_the_trainers_imports():
    """What rl.loop.train does before it starts Ray (import, parse and check the config, make the
    clients' classes) imports neither peft nor transformers (2.4 s on this machine), which
    were on the path to the first sample; the trainer's start imports them."""
    script = """
import sys
from rl.cli import parse_config
from rl.loop.train import Config
import rl.client.service, trainers
parse_config(Config, [])
heavy = [m for m in ("peft", "transformers", "vllm", "trainers.trainer") if m in sys.modules]
print("imported:", heavy)
assert trainers.LoraTrainer.__module__ == "trainers.trainer"  # still there on first use
sys.exit(3 if heavy else 0)
"""
    _run_script(script, timeout=120)


def test_kill_9_then_resume_reaches_the_same_end_with_the_same_data(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_model, run_dir, num_steps=5, save_every=1, log_samples=0)
    args = [a for a in args if not a.startswith("sampler.sync_mode")]  # its own Ray: merged is fine
    first = _run_train(args, tmp_path / "first.log")
    checkpoints = run_dir / "checkpoints.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if checkpoints.exists() and checkpoints.read_text().count("\n") >= 2:
                break
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
        first.wait()
    killed_at = json.loads(checkpoints.read_text().splitlines()[-1])["step"]
    assert 2 <= killed_at < 5

    second = _run_train(args, tmp_path / "second.log")
    try:
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    log = (tmp_path / "second.log").read_text()
    assert f"at step {killed_at}" in log

    records = [r for r in read_metrics(run_dir) if "data/problem_ids" in r]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    # The data order of an uninterrupted run, computed from the dataset itself.
    from transformers import AutoTokenizer

    from envs.chat import ChatRenderer

    config = parse_config(Config, args)
    train, _ = build_datasets(config, ChatRenderer(AutoTokenizer.from_pretrained(tiny_model)))
    expected = [[builder_id(b) for b in batch_builders(train, step)] for step in range(5)]
    assert [r["data/problem_ids"] for r in records] == expected
    last = json.loads(checkpoints.read_text().splitlines()[-1])
    assert last["step"] == 5 and "rng" in last["loop_state"]


@pytest.mark.slow
def test_end_to_end_with_the_vllm_engine(ray_local, vllm_tiny_model, tmp_path):
    pytest.importorskip("vllm")
    args = tiny_args(
        vllm_tiny_model,
        tmp_path,
        num_steps=2,
        max_steps_off_policy=1,
        **{"sampler.max_model_len": 256},
    )
    args = [a for a in args if not a.startswith(("sampler.engine", "sampler.sync_mode"))]
    trainer = main([*args, "sampler.engine=vllm", "sampler.enforce_eager=true"])
    assert [s["step"] for s in trainer.history] == [0, 1]
    assert abs(trainer.history[0]["optim/kl_sample_train_v1"]) < 1e-2
    assert all(s["optim/num_datums"] == 12 for s in trainer.history)
