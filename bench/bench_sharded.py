"""The sharded trainer's overhead: world_size 2 vs 1 on the same cores, through the client API.

    .venv/bin/python bench/bench_sharded.py            # SmolLM2-135M-Instruct, LoRA r32

Both trainers get the same CPU threads in all (world_size 1: `threads`; world_size 2:
`threads` / 2 per rank), so the ratio is the cost of the group on the same hardware: the
per-layer all-gathers of the sharded weights (forward, and again in the backward), the
gradient all-reduce, the logprob all-gather, and the fan-out of each call from rank 0. On a
2-core machine two ranks cannot be faster; on GPUs each rank has a device of its own.
Measured per world size: group start (actors, model load, rendezvous, sharding),
`forward_backward` + `optim_step` and `forward` tokens/s on 8 x 128 tokens, and the peak
resident memory of the trainer processes. The loss of the first step is printed for both as
a check that they computed the same thing.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass

from rl.cli import parse_config


@dataclass(frozen=True)
class Config:
    base_model: str = "SmolLM2-135M-Instruct"
    """model to train"""
    rank: int = 32
    """LoRA rank"""
    threads: int = 2
    """torch threads in all (split between the ranks)"""
    dtype: str = "float32"
    """base-weight dtype (the trainer's CPU default)"""
    steps: int = 3
    """timed steps per measurement (after one warm-up step)"""
    seed: int = 0
    """data seed"""


def batch(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(49152) for _ in range(129)] for _ in range(8)]


def measure(config: Config, world_size: int) -> dict[str, float]:
    import rl
    from rl import types
    from trainers import TrainerConfig

    trainer_config = TrainerConfig(
        dtype=config.dtype,  # type: ignore[arg-type]
        num_threads=max(1, config.threads // world_size),
        num_cpus=1.0 / world_size,
        world_size=world_size,
    )
    service = rl.ServiceClient(trainer_config=trainer_config)
    began = time.perf_counter()
    client = service.create_lora_training_client(config.base_model, rank=config.rank, seed=0)
    results = {"start_s": time.perf_counter() - began}
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
        )
        for s in batch(config.seed)
    ]
    first = client.forward_backward(data, "cross_entropy").result()  # warm-up
    client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    results["first_loss"] = first.metrics["loss:sum"]
    start = time.perf_counter()
    for _ in range(config.steps):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    results["train_s"] = (time.perf_counter() - start) / config.steps
    start = time.perf_counter()
    for _ in range(config.steps):
        client.forward(data).result()
    results["forward_s"] = (time.perf_counter() - start) / config.steps
    memory = rl.futures.ray_get(client.trainer_actor.memory_stats.remote())
    results["rss_mib"] = memory.get("peak_rss_mib_all_ranks", memory["peak_rss_mib"])
    service.close()
    return results


def main(config: Config) -> None:
    import ray

    print(f"config: {asdict(config)}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    one, two = measure(config, 1), measure(config, 2)
    ray.shutdown()
    tokens = sum(len(s) - 1 for s in batch(config.seed))
    print(f"\n8 x 128 batch ({tokens} tokens), {config.threads} threads in all:")
    print(f"{'':34}{'world_size 1':>14}{'world_size 2':>14}{'2 / 1':>8}")

    def row(label: str, a: float, b: float, unit: str, ratio: float) -> None:
        print(f"  {label:32}{a:>10.1f} {unit:<3}{b:>10.1f} {unit:<3}{ratio:>8.3f}")

    row("group start", one["start_s"], two["start_s"], "s", two["start_s"] / one["start_s"])
    row(
        "forward_backward + optim_step",
        tokens / one["train_s"],
        tokens / two["train_s"],
        "t/s",
        one["train_s"] / two["train_s"],
    )
    row(
        "forward",
        tokens / one["forward_s"],
        tokens / two["forward_s"],
        "t/s",
        one["forward_s"] / two["forward_s"],
    )
    row(
        "peak RSS, all ranks",
        one["rss_mib"],
        two["rss_mib"],
        "MiB",
        two["rss_mib"] / one["rss_mib"],
    )
    print(f"  first-step loss:sum {one['first_loss']:.4f} vs {two['first_loss']:.4f}")


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
