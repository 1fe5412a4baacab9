"""Examples run as tests, with tiny settings (a tiny random model, a few steps), in-process and
against the server through the official tinker SDK."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    """An engineroom server on a thread, serving the tiny model; yields (url, api key)."""
    from rl.server import ServerConfig, build_service, start_in_thread
    from rl.server.keys import KeyStore
    from samplers.config import SamplerConfig
    from trainers.config import TrainerConfig

    config = ServerConfig(
        port=0,
        home=str(tmp_path_factory.mktemp("examples-server")),
        models=tiny_model,
        sampler=SamplerConfig(engine="torch", num_threads=1, num_cpus_per_actor=0.05),
        trainer=TrainerConfig(dtype="float32", num_threads=1, num_cpus=0.1),
    )
    key = KeyStore(config.resolved_keys_file()).add("examples")
    service = build_service(config)
    running = start_in_thread(config, service)
    yield running.url, key
    running.stop()
    service.close()


SL_ARGS = ["steps=8", "batch_size=4", "learning_rate=5e-3", "rank=8", "max_length=96"]


def test_sl_loop_lowers_the_loss(service, tiny_model):
    sl_loop = load_example("sl_loop")
    losses = sl_loop.main([f"base_model={tiny_model}", *SL_ARGS], service=service)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] * 0.9


def test_sl_loop_against_the_server(server, tiny_model, monkeypatch):
    url, key = server
    monkeypatch.setenv("TINKER_API_KEY", key)
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    sl_loop = load_example("sl_loop")
    losses = sl_loop.main([f"base_model={tiny_model}", f"base_url={url}", *SL_ARGS])
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] * 0.9


RL_ARGS = [
    "num_steps=2", "groups_per_batch=3", "group_size=4", "max_tokens=6", "num_test=4",
    "eval_every=1", "rank=8", "learning_rate=1e-2",
]  # fmt: skip


def rl_loop_varied_rewards():
    """The example, with a reward that varies for a random model's replies (its own, which
    looks for a sum, gives a tiny random model -1 nearly always: no group would train)."""
    rl_loop = load_example("rl_loop")
    rl_loop.reward = lambda reply, problem: float(len(reply) % 3)
    return rl_loop


def check_rl_history(history):
    assert [h["step"] for h in history] == [0, 1, 2]
    assert all("held_out" in h for h in history)  # every step, and after the last
    trained = [h for h in history if "datums" in h]
    assert len(trained) == 2 and all(h["datums"] > 0 for h in trained)
    assert all(math.isfinite(h["reward"]) for h in trained)


def test_rl_loop_runs_in_process(torch_service, tiny_model):
    history = rl_loop_varied_rewards().main([f"base_model={tiny_model}", *RL_ARGS], torch_service)
    check_rl_history(history)


def test_rl_loop_against_the_server(server, tiny_model, monkeypatch):
    url, key = server
    monkeypatch.setenv("TINKER_API_KEY", key)
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    history = rl_loop_varied_rewards().main(
        [f"base_model={tiny_model}", f"base_url={url}", *RL_ARGS]
    )
    check_rl_history(history)


def test_rl_loop_reward():
    rl_loop = load_example("rl_loop")
    assert rl_loop.reward("3 + 7 = 10", (3, 7)) == 1.0
    assert rl_loop.reward("3 + 7 = 11", (3, 7)) == 0.0  # a wrong equation
    assert rl_loop.reward("It is 10.", (3, 7)) == 0.0  # the right number, another form
    assert rl_loop.reward("ten", (3, 7)) == -1.0
