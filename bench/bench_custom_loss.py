"""Server-side custom losses against a built-in loss and the SDK's client-side path.

    .venv/bin/python bench/bench_custom_loss.py      # SmolLM2-135M-Instruct, LoRA r32, fp32

The official `tinker` SDK against `rl.server` over loopback HTTP, three training clients of
the same seed on one trainer, alternating round by round; a step is `forward_backward` +
`optim_step` on `rows` x `length` tokens of PPO data:

1. built-in: `forward_backward(data, "ppo")`, the baseline;
2. server-side custom: the same PPO objective traced by `create_custom_loss` and run by
   `forward_backward_custom(data, handle)` in one server call (trainers/custom_graph.py).
   Target <= 1.10x the baseline's step time;
3. client-side custom: the same `LossHandle` without its server id, which the SDK runs as a
   forward, a local backward and a `cross_entropy` forward-backward (two passes).
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from rl.cli import parse_config


@dataclass(frozen=True)
class Config:
    base_model: str = "SmolLM2-135M-Instruct"
    """model to train (a name this server serves, or a local model directory)"""
    rank: int = 32
    """LoRA rank"""
    trainer_dtype: str = "float32"
    """trainer base-weight dtype"""
    rows: int = 8
    """datums per step"""
    length: int = 128
    """tokens per datum"""
    rounds: int = 4
    """timed steps per contender (after one warm-up each)"""
    seed: int = 0
    """data seed"""


def ppo_like(logprobs, logprobs_old, advantages):
    """The built-in `ppo` objective (clip 0.8 / 1.2, no weights) as a per-datum custom loss."""
    import torch

    ratio = torch.exp(logprobs - logprobs_old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"custom/ratio:mean": ratio.mean()}


def batch(config: Config, seed: int, old_key: str) -> list:
    """`rows` PPO datums; the sampler logprobs under `old_key` (`logprobs` for the built-in
    loss, `logprobs_old` for the custom one, whose `logprobs` is the trainer's)."""
    import torch
    from tinker import types as tt

    rng = random.Random(seed)
    out = []
    for _ in range(config.rows):
        tokens = [rng.randrange(49152) for _ in range(config.length + 1)]
        old = torch.tensor([-rng.random() * 6 - 4 for _ in range(config.length)])
        advantages = torch.tensor([rng.choice([-1.0, 1.0])] * config.length)
        out.append(
            tt.Datum(
                model_input=tt.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    old_key: old,
                    "advantages": advantages,
                },
            )
        )
    return out


def main(config: Config) -> None:
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    warnings.simplefilter("ignore", FutureWarning)
    import logging

    logging.getLogger("tinker").setLevel(logging.ERROR)
    import tinker
    from tinker import types as tt

    print(f"config: {asdict(config)}")
    service, running, key = start_server(config)
    try:
        sdk = tinker.ServiceClient(base_url=running.url, api_key=key)
        ranks = {"logprobs": 1, "logprobs_old": 1, "advantages": 1}
        handle = sdk.create_custom_loss(ppo_like, ranks).result()
        assert handle.loss_id is not None, "the server did not take the loss"
        local = dataclasses.replace(handle, loss_id=None)
        clients = [
            sdk.create_lora_training_client(config.base_model, rank=config.rank, seed=1).result()
            for _ in range(3)
        ]
        adam = tt.AdamParams(learning_rate=1e-5)
        contenders = {
            "built-in ppo": lambda c, s: c.forward_backward(batch(config, s, "logprobs"), "ppo"),
            "server-side custom": lambda c, s: c.forward_backward_custom(
                batch(config, s, "logprobs_old"), handle
            ),
            "client-side custom": lambda c, s: c.forward_backward_custom(
                batch(config, s, "logprobs_old"), local
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        losses: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(-1, config.rounds):  # round -1: warm-up
            for client, (name, run) in zip(clients, contenders.items(), strict=True):
                start = time.perf_counter()
                fb = run(client, config.seed + r)
                opt = client.optim_step(adam)
                loss = fb.result().metrics["loss:sum"]
                opt.result()
                if r >= 0:
                    times[name].append(time.perf_counter() - start)
                    losses[name].append(loss)
            if r >= 0:
                print(f"round {r}: " + "  ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    finally:
        running.stop()
        service.close()
    report(config, times, losses)


def start_server(config: Config) -> tuple[Any, Any, str]:
    """The in-process service and the HTTP server in front of it."""
    from rl.server import ServerConfig, build_service, start_in_thread
    from rl.server.keys import KeyStore
    from samplers.config import SamplerConfig
    from trainers.config import TrainerConfig

    server_config = ServerConfig(
        port=0,
        home=tempfile.mkdtemp(prefix="bench-custom-loss-"),
        models=config.base_model,
        trainer=TrainerConfig(dtype=config.trainer_dtype),  # type: ignore[arg-type]
        sampler=SamplerConfig(engine="torch"),  # no sampling here
    )
    key = KeyStore(server_config.resolved_keys_file()).add("bench")
    service = build_service(server_config)
    return service, start_in_thread(server_config, service), key


def report(config: Config, times: dict[str, list[float]], losses: dict[str, list[float]]) -> None:
    """Step seconds per contender (median and best) and the ratio to the built-in loss."""
    base = statistics.median(times["built-in ppo"])
    print(f"\nforward_backward + optim_step, {config.rows} x {config.length}, LoRA r{config.rank}")
    print(
        f"{'contender':<20} {'median s':>9} {'best s':>8} {'vs built-in':>12}   loss:sum per step"
    )
    for name, seconds in times.items():
        median = statistics.median(seconds)
        summary = " ".join(f"{x:.3f}" for x in losses[name])
        print(f"{name:<20} {median:9.3f} {min(seconds):8.3f} {median / base:11.3f}x   {summary}")
    ratio = statistics.median(times["server-side custom"]) / base
    print(f"server-side custom / built-in: {ratio:.3f}x (target <= 1.10)")


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
