"""Tenants sharing passes: K adapters' forward_backward calls as one pass over the base model.

    .venv/bin/python bench/bench_tenants.py                # SmolLM2-135M-Instruct, r16, CPU
    .venv/bin/python bench/bench_tenants.py rows=16 tokens=64 tenants=1,2,4

One LoraTrainer in this process (its Ray actor is a thin shell around it), K tenants (adapters
of rank `rank`) and the same total batch of `rows` x `tokens` tokens split evenly between them.
For each K, in one run:

    shared      one `forward_backward_many` with the K calls: one pass, each row with its
                own adapter (trainers/mixed.py), what the server does for calls that wait
                together (rl/client/passes.py)
    one-by-one  the K calls one after another, as a trainer without shared passes runs them
    one tenant  all the rows as one adapter's call: the ceiling

Prints tokens/s of each and the ratios shared / one tenant and shared / one-by-one (medians of
`steps` timed repeats after a warm-up). bench/gpu_check.py runs the same measurement on a GPU.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from rl.cli import parse_config


@dataclass(frozen=True)
class Config:
    base_model: str = "SmolLM2-135M-Instruct"
    """model to train (built-in name or local HF directory)"""
    rank: int = 16
    """LoRA rank of every tenant"""
    tenants: str = "1,2,4,8"
    """the K to measure"""
    rows: int = 16
    """rows in the whole batch, split between the tenants"""
    tokens: int = 128
    """tokens per row"""
    steps: int = 3
    """timed repeats per measurement (after one warm-up)"""
    dtype: str = "auto"
    """trainer dtype"""
    device: str = "auto"
    """trainer device"""


def measure_tenants(
    model_dir: str,
    trainer_config: dict[str, Any],
    tenants: list[int],
    rows: int,
    tokens: int,
    rank: int,
    steps: int,
    sync: Callable[[], None] = lambda: None,
    vocab_size: int = 30000,
) -> list[dict[str, float]]:
    """Tokens/s of shared, one-by-one and one-tenant calls for each K in `tenants`."""
    from rl import types
    from trainers import LoraTrainer, TrainerConfig
    from trainers.mixed import Call

    trainer = LoraTrainer(model_dir, TrainerConfig(**trainer_config))
    for i in range(max(tenants)):
        trainer.create_adapter(f"t{i}", types.LoraConfig(rank=rank, seed=i))
    rng = random.Random(0)
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(
                [rng.randrange(1, vocab_size) for _ in range(tokens)]
            ),
            loss_fn_inputs={"target_tokens": [1] * tokens, "weights": [1.0] * tokens},
        )
        for _ in range(rows)
    ]

    def timed(step: Callable[[], object]) -> float:
        step()  # warm-up
        times = []
        for _ in range(steps):
            sync()
            began = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - began)
        return rows * tokens / statistics.median(times)

    one = timed(lambda: trainer.forward_backward("t0", data, "cross_entropy"))
    results = []
    for k in tenants:
        parts = [data[j::k] for j in range(k)]
        calls = [Call(f"t{j}", part) for j, part in enumerate(parts)]
        shared = timed(lambda calls=calls: trainer.forward_backward_many(calls))
        serial = timed(
            lambda parts=parts: [
                trainer.forward_backward(f"t{j}", part, "cross_entropy")
                for j, part in enumerate(parts)
            ]
        )
        results.append(
            {"tenants": k, "shared": shared, "one_by_one": serial, "one_tenant": one,
             "shared_vs_one_tenant": shared / one, "shared_vs_one_by_one": shared / serial}
        )  # fmt: skip
    return results


def report(results: list[dict[str, float]]) -> None:
    print("\n tenants  shared tok/s  one-by-one  one tenant  shared/one tenant  shared/one-by-one")
    for r in results:
        print(
            f" {r['tenants']:7.0f}  {r['shared']:12.0f}  {r['one_by_one']:10.0f}  "
            f"{r['one_tenant']:10.0f}  {r['shared_vs_one_tenant']:17.2f}x  "
            f"{r['shared_vs_one_by_one']:16.2f}x"
        )


def main(config: Config) -> None:
    from rl.models import resolve_model

    print(f"config: {asdict(config)}", flush=True)
    tenants = [int(k) for k in config.tenants.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as work:
        trainer_config = {"dtype": config.dtype, "device": config.device, "checkpoint_dir": work}
        results = measure_tenants(
            resolve_model(config.base_model),
            trainer_config,
            tenants,
            config.rows,
            config.tokens,
            config.rank,
            config.steps,
        )
    report(results)


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
