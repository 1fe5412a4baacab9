"""Trainer throughput and memory: the client API vs a plain in-process peft loop, in one run.

    .venv/bin/python bench/bench_trainer.py            # SmolLM2-135M-Instruct, LoRA r32, bf16

1. `forward_backward` + `optim_step` tokens/s through the client API (Ray trainer actor) vs a
   plain peft training loop on the same batch of 8 x 128 tokens. Target >= 0.95x.
2. A mixed-length batch (32 datums, lengths 16-512 log-uniform) through the API (bucketed)
   vs the plain loop padding everything to the longest (in micro-batches of 8 rows: the whole
   padded batch in one call needs more than this machine's 24 GiB). Target >= 1.5x.
3. Peak resident memory of the trainer actor process vs the plain loop's process.

The plain loop runs first, in a child process of its own (so its peak memory is its own),
then the API; both use the same thread count. Ratios are what to compare across runs: the
machine is shared and absolute times drift.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import resource
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
    """torch threads for both contenders"""
    dtype: str = "bfloat16"
    """base-weight dtype"""
    steps: int = 3
    """timed steps per measurement (after one warm-up step)"""
    mixed_steps: int = 1
    """timed steps for the mixed-length batch (after one warm-up)"""
    seed: int = 0
    """data seed"""


def uniform_batch(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(49152) for _ in range(129)] for _ in range(8)]


def mixed_batch(seed: int) -> list[list[int]]:
    rng = random.Random(seed + 1)
    lengths = [int(math.exp(rng.uniform(math.log(16), math.log(512)))) for _ in range(32)]
    return [[rng.randrange(49152) for _ in range(n + 1)] for n in lengths]


def plain_loop(config: Config, queue: mp.Queue) -> None:
    """The baseline: peft + AdamW in-process, each batch padded to its longest sequence."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rl.models import resolve_model
    from rl.types import LoraConfig
    from trainers.lora import peft_config

    torch.set_num_threads(config.threads)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(config.base_model), dtype=getattr(torch, config.dtype)
    )
    model = get_peft_model(model, peft_config(model, LoraConfig(rank=config.rank), 32.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12)

    def step(seqs: list[list[int]]) -> None:
        width = max(len(s) for s in seqs) - 1
        # Padded to the longest of the whole batch; micro-batches of 8 rows with gradient
        # accumulation, because all 32 rows x 512 in one call exceed this machine's 24 GiB.
        for first in range(0, len(seqs), 8):
            rows = seqs[first : first + 8]
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for row, s in enumerate(rows):
                n = len(s) - 1
                ids[row, :n] = torch.tensor(s[:-1])
                mask[row, :n] = 1
                labels[row, :n] = torch.tensor(s[1:])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            )
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results = {}
    for label, seqs, steps in (
        ("uniform", uniform_batch(config.seed), config.steps),
        ("mixed", mixed_batch(config.seed), config.mixed_steps),
    ):
        step(seqs)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step(seqs)
        results[label] = (time.perf_counter() - start) / steps
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(results)


def api_loop(config: Config) -> dict[str, float]:
    import rl
    from rl import types
    from trainers import TrainerConfig

    trainer_config = TrainerConfig(dtype=config.dtype, num_threads=config.threads)  # type: ignore[arg-type]
    service = rl.ServiceClient(trainer_config=trainer_config, num_cpus=4)
    client = service.create_lora_training_client(config.base_model, rank=config.rank, seed=0)

    def datums(seqs: list[list[int]]) -> list[types.Datum]:
        return [
            types.Datum(
                model_input=types.ModelInput.from_ints(s[:-1]),
                loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
            )
            for s in seqs
        ]

    def step(data: list[types.Datum]) -> None:
        client.forward_backward(data, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-4)).result()

    results = {}
    for label, seqs, steps in (
        ("uniform", uniform_batch(config.seed), config.steps),
        ("mixed", mixed_batch(config.seed), config.mixed_steps),
    ):
        data = datums(seqs)
        step(data)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step(data)
        results[label] = (time.perf_counter() - start) / steps
    results["peak_rss_mib"] = rl.futures.ray_get(client.trainer_actor.memory_stats.remote())[
        "peak_rss_mib"
    ]
    service.close()
    return results


def main(config: Config) -> None:
    print(f"config: {asdict(config)}")
    queue: mp.Queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=plain_loop, args=(config, queue))
    child.start()
    plain = queue.get()
    child.join()
    api = api_loop(config)

    uniform_tokens = sum(len(s) - 1 for s in uniform_batch(config.seed))
    mixed_tokens = sum(len(s) - 1 for s in mixed_batch(config.seed))
    padded = 32 * max(len(s) - 1 for s in mixed_batch(config.seed))
    print(f"\n8 x 128 batch ({uniform_tokens} tokens), forward_backward + optim_step:")
    print(f"  plain peft loop   {uniform_tokens / plain['uniform']:8.1f} tok/s")
    print(f"  client API        {uniform_tokens / api['uniform']:8.1f} tok/s")
    print(f"  ratio API / plain {plain['uniform'] / api['uniform']:8.3f}x   (target >= 0.95)")
    print(f"\nmixed batch: 32 datums, {mixed_tokens} real tokens, {padded} padded to the longest:")
    print(f"  plain loop, padded  {mixed_tokens / plain['mixed']:8.1f} real tok/s")
    print(f"  client API, bucketed{mixed_tokens / api['mixed']:8.1f} real tok/s")
    print(f"  ratio API / plain   {plain['mixed'] / api['mixed']:8.3f}x   (target >= 1.5)")
    print("\npeak resident memory:")
    print(f"  plain loop process  {plain['peak_rss_mib']:8.0f} MiB")
    print(f"  trainer actor       {api['peak_rss_mib']:8.0f} MiB")
    print(f"  ratio actor / plain {api['peak_rss_mib'] / plain['peak_rss_mib']:8.3f}x")


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
