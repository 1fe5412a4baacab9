"""Adapters that page out: many registered, few resident, in one trainer process.

    .venv/bin/python bench/bench_paging.py                 # 200 rank-16 SmolLM2 adapters, 8 resident
    .venv/bin/python bench/bench_paging.py adapters=40 calls=10

Registers `adapters` LoRA adapters on one LoraTrainer with `TrainerConfig.max_resident_adapters`
= `resident` (the rest page out to files), each trained one step, then times calls
(forward_backward + optim_step of one small batch) on adapters picked at random: a warm call
finds its adapter resident, a cold one pages it in (and the least recently used one out).

Prints the cold/warm time ratio, and the trainer's resident memory with every adapter
registered against its memory with `resident` adapters (measured in the same run, before the
rest were created): the bound holds when the ratio stays near 1.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rl.cli import parse_config


@dataclass(frozen=True)
class Config:
    base_model: str = "SmolLM2-135M-Instruct"
    """model to train"""
    adapters: int = 200
    """adapters registered"""
    resident: int = 8
    """adapters kept in the model (TrainerConfig.max_resident_adapters)"""
    rank: int = 16
    """LoRA rank"""
    calls: int = 20
    """timed calls of each kind, warm and cold"""
    tokens: int = 64
    """tokens per datum of the timed batch (4 datums)"""
    seed: int = 0
    """data and adapter-choice seed"""


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(config: Config) -> None:
    from rl import types
    from rl.models import resolve_model
    from trainers import LoraTrainer, TrainerConfig

    print(f"config: {asdict(config)}", flush=True)
    rng = random.Random(config.seed)
    batch = [
        types.Datum(
            model_input=types.ModelInput.from_ints([rng.randrange(1, 49000) for _ in range(n)]),
            loss_fn_inputs={"target_tokens": [1] * n, "weights": [1.0] * n},
        )
        for n in [config.tokens] * 4
    ]
    adam = types.AdamParams(learning_rate=1e-4)
    work = tempfile.mkdtemp(prefix="bench-paging-")
    trainer = LoraTrainer(
        resolve_model(config.base_model),
        TrainerConfig(checkpoint_dir=work, max_resident_adapters=config.resident),
    )

    def call(model_id: str) -> float:
        began = time.perf_counter()
        trainer.forward_backward(model_id, batch, "cross_entropy")
        trainer.optim_step(model_id, adam)
        return time.perf_counter() - began

    began = time.perf_counter()
    for i in range(config.adapters):
        trainer.create_adapter(f"m{i}", types.LoraConfig(rank=config.rank, seed=i))
        call(f"m{i}")  # weights, gradients and AdamW state, as a trained client has
        if i + 1 == config.resident:
            with_resident = rss_mib()
    registered = rss_mib()
    print(
        f"registered {config.adapters} adapters in {time.perf_counter() - began:.0f}s", flush=True
    )
    warm, cold = measure_calls(config, trainer, call, rng)
    report(config, trainer, warm, cold, with_resident, registered)


def measure_calls(
    config: Config, trainer, call, rng: random.Random
) -> tuple[list[float], list[float]]:
    """`calls` warm calls (the most recent adapter) and `calls` cold ones (a paged one)."""
    warm, cold = [], []
    for _ in range(config.calls):
        resident = trainer.resident_adapter_ids()
        warm.append(call(resident[-1]))
        paged = sorted(set(trainer.adapter_ids()) - set(trainer.resident_adapter_ids()))
        cold.append(call(rng.choice(paged)))
    return warm, cold


def report(
    config: Config, trainer, warm: list[float], cold: list[float], base: float, full: float
) -> None:
    w, c = statistics.median(warm), statistics.median(cold)
    print(f"\n{config.adapters} adapters, {config.resident} resident, rank {config.rank}:")
    print(
        f"  resident now: {len(trainer.resident_adapter_ids())}, registered: {len(trainer.adapter_ids())}"
    )
    print(f"  call (fwd_bwd + optim_step, 4 x {config.tokens} tokens), median of {config.calls}:")
    print(f"    warm {w:.3f}s  cold {c:.3f}s  cold/warm {c / w:.2f}x  (cold extra {c - w:.3f}s)")
    print(f"  trainer RSS: with {config.resident} adapters {base:.0f} MiB, with all "
          f"{config.adapters} {full:.0f} MiB: {full / base:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
