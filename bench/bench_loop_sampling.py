"""The main job's sampling against the raw vLLM engine, on the loop's own request shapes.

    .venv/bin/python bench/bench_loop_sampling.py            # 3 alternating rounds

Two shapes, both from `python -m rl.loop.train`'s preset (arithmetic level 1, SmolLM2-135M-Instruct):

- a training batch: 12 problems x 8 samples, temperature 1, <= 16 tokens, the logprob of every
  sampled token (batches 0, 1, 2, ... of the loop's own order);
- the held-out eval: 100 problems, greedy, <= 16 tokens.

Raw: `vllm.LLM.generate` in a child process of its own, with the engine settings the preset
gives its samplers (float32, eager, prefix caching, KV block size, context length, threads),
every prompt of the shape in one call (`n=8` for a training batch), detokenization off.

Loop: the code `rl.loop.train` runs, in this process: its `setup` starts the trainer and the
samplers (Ray actors) as the main job does, syncs the initial weights in the preset's mode,
then a round times `rl.loop.rollouts.run_batch` on the loop's batch builders (rendering, sampling
through `SamplingClient.sample`, the reward) and the held-out batch the loop's `evaluate` runs.

Raw and loop alternate, round by round, so load from other users hits both alike; the ratio
loop / raw of tokens per second is printed per shape (target: >= 0.8).
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from rl.cli import parse_config


@dataclass(frozen=True)
class Config:
    rounds: int = 3
    """alternating raw / loop rounds (after one warm-up each)"""


def raw_engine(engine: dict[str, Any], threads: int, shapes: dict[str, Any], pipe: Any) -> None:
    """The baseline, in a child process: one `LLM.generate` per shape and round."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch

    torch.set_num_threads(threads)
    from vllm import LLM, SamplingParams

    llm = LLM(**engine)
    params = {
        "batch": SamplingParams(n=8, max_tokens=16, temperature=1.0, logprobs=0, detokenize=False),
        "eval": SamplingParams(max_tokens=16, temperature=0.0, detokenize=False),
    }
    pipe.send("ready")
    while (message := pipe.recv()) != "stop":
        shape, index = message
        inputs = [{"prompt_token_ids": p} for p in shapes[shape][index]]
        start = time.perf_counter()
        outputs = llm.generate(inputs, params[shape], use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        pipe.send({"seconds": seconds, "tokens": tokens})


def main(config: Config) -> None:
    from rl.loop.train import Config as TrainConfig
    from rl.loop.train import setup

    work = tempfile.mkdtemp(prefix="bench_loop_sampling_")
    train_config = TrainConfig(log_dir=work, on_existing="overwrite")
    trainer, _ = setup(train_config, None)
    rounds = config.rounds + 1  # the first round of each side is a warm-up
    test_builders = [
        b for i in range(len(trainer.test_data)) for b in trainer.test_data.get_batch(i)
    ]
    eval_config = dataclasses.replace(
        trainer.rollout_config, temperature=train_config.eval_temperature, error_policy="retry"
    )
    shapes = request_shapes(trainer, test_builders, rounds)
    parent, child = start_raw_engine(train_config, shapes)
    try:
        runs = asyncio.run(loop_rounds(trainer, parent, test_builders, eval_config, rounds))
    finally:
        parent.send("stop")
        child.join(timeout=60)
        trainer.service.close()
    report(config, runs)


def request_shapes(trainer: Any, test_builders: list[Any], rounds: int) -> dict[str, Any]:
    """The prompt tokens of each shape and round: the loop's training batches 0, 1, 2, ...
    and the whole held-out set."""
    from envs.chat import ChatRenderer
    from rl.loop.pipeline import batch_builders

    renderer = ChatRenderer(trainer.tokenizer)

    def prompts(builders: list[Any]) -> list[list[int]]:
        return [renderer.build_prompt(b.task.messages(b.problem.question)) for b in builders]

    return {
        "batch": [prompts(batch_builders(trainer.train_data, r)) for r in range(rounds)],
        "eval": [prompts(test_builders)] * rounds,
    }


def start_raw_engine(train_config: Any, shapes: dict[str, Any]) -> tuple[Any, Any]:
    """The raw engine's child process, with the preset's sampler settings, once it is ready:
    (our end of its pipe, the process)."""
    from rl.models import resolve_model

    sampler = train_config.actor_configs()[1]
    engine = {
        "model": resolve_model(train_config.base_model),
        "dtype": sampler.resolved_dtype(False),
        "enforce_eager": sampler.enforce_eager,
        "enable_prefix_caching": sampler.enable_prefix_caching,
        "block_size": sampler.resolved_block_size(False),
        "max_model_len": train_config.sampler.max_model_len,
        "kv_cache_memory_bytes": int(sampler.kv_cache_gib * 2**30),
        "seed": 0,
    }
    ctx = mp.get_context("spawn")
    parent, child_end = ctx.Pipe()
    child = ctx.Process(
        target=raw_engine, args=(engine, sampler.resolved_threads(), shapes, child_end)
    )
    child.start()
    if not parent.poll(900) or parent.recv() != "ready":
        raise RuntimeError("the raw vLLM engine did not start")
    return parent, child


async def loop_rounds(
    trainer: Any, parent: Any, test_builders: list[Any], eval_config: Any, rounds: int
) -> dict[str, list[dict[str, float]]]:
    """Raw and loop alternating on each shape, `rounds` times; tokens/s and seconds of each
    after the first round."""
    from rl.loop.pipeline import batch_builders, sync
    from rl.loop.rollouts import run_batch

    client = await sync(trainer)
    runs: dict[str, list[dict[str, float]]] = {"batch": [], "eval": []}
    for r in range(rounds):
        for shape in ("batch", "eval"):
            parent.send((shape, r))
            raw = parent.recv()
            start = time.perf_counter()
            if shape == "batch":
                batch = await run_batch(
                    batch_builders(trainer.train_data, r), client, trainer.rollout_config
                )
            else:
                batch = await run_batch(test_builders, client, eval_config)
            tokens = sum(
                len(t.action_tokens)
                for g in batch.groups
                for tr in g.trajectories
                for t in tr.transitions
            )
            seconds = time.perf_counter() - start
            if r:
                runs[shape].append(
                    {"raw": raw["tokens"] / raw["seconds"], "loop": tokens / seconds,
                     "raw_s": raw["seconds"], "loop_s": seconds}
                )  # fmt: skip
    return runs


def report(config: Config, runs: dict[str, list[dict[str, float]]]) -> None:
    """Prints each shape's median tokens/s, raw and loop, and their ratio."""
    print(f"\n{config.rounds} rounds, loop vs raw vLLM, tokens/s (seconds per call):")
    for shape, rows in runs.items():
        raw = statistics.median(r["raw"] for r in rows)
        loop = statistics.median(r["loop"] for r in rows)
        times = ", ".join(f"{r['loop_s']:.1f}/{r['raw_s']:.1f}" for r in rows)
        print(
            f"  {shape:6s} raw {raw:6.1f}  loop {loop:6.1f}  loop/raw {loop / raw:.3f}  [{times}]"
        )


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
