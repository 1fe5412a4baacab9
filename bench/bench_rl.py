"""Seconds per RL step (rl.loop.train) on SmolLM2, sync vs async, and the loop's own overhead.

    python bench/bench_rl.py               # the rl.loop.train preset at 8 groups, 4 steps per mode
    python bench/bench_rl.py steps=4 groups_per_batch=8 out=bench/rl.json
    python bench/bench_rl.py trainer_threads=1 sampler_threads=1    # cores split, not shared

Three measurements, each on a fresh ServiceClient (its own trainer and vLLM engine) in one
embedded Ray:

1. sync: `max_steps_off_policy=0`, per-step wall time and its phases (sample, train, sync);
2. async: the same config with `max_steps_off_policy=1`;
3. raw parts, on the sync run's own training client and engine right after it: the same
   batch's generation as bare `sample` calls (one per group, all in flight), one
   forward_backward + optim_step on datums of the same size, and one weight sync.

overhead = sync step / (raw generation + raw training + raw sync); target <= 1.10. Also
reported: sync step / (its own sample + train + sync phases), the loop's cost beyond them,
and the raw parts measured again after the async run, which shows how much the machine's
load drifted between the runs (on a shared CPU it can dwarf the differences measured).
async speed-up = async step / sync step; target <= 0.85. The first step of each run (engine
warm-up, first compilation) is left out of the means.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.cli import parse_config  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    steps: int = 4
    """RL steps per mode (the first is warm-up, left out of the means)"""
    groups_per_batch: int = 8
    """problems per step"""
    group_size: int = 8
    """samples per problem"""
    max_tokens: int = 16
    """tokens sampled per reply"""
    base_model: str = "SmolLM2-135M-Instruct"
    """model"""
    sampler_engine: str = "vllm"
    """vllm | torch"""
    raw_reps: int = 3
    """repetitions of each raw part"""
    trainer_threads: int = 0
    """torch threads in the trainer (0 = all cores)"""
    sampler_threads: int = 0
    """torch threads in the sampler engine (0 = all cores)"""
    out: str = ""
    """write the figures as JSON here too ('' = print only)"""
    log_root: str = "/tmp/engineroom-bench-rl"
    """run directories"""


def loop_args(config: BenchConfig, mode: str, off_policy: int) -> list[str]:
    return [
        f"base_model={config.base_model}",
        f"num_steps={config.steps}",
        f"groups_per_batch={config.groups_per_batch}",
        f"group_size={config.group_size}",
        f"max_tokens={config.max_tokens}",
        f"max_steps_off_policy={off_policy}",
        f"sampler.engine={config.sampler_engine}",
        f"trainer.num_threads={config.trainer_threads}",
        f"sampler.num_threads={config.sampler_threads}",
        "remove_constant_groups=false",  # every step trains on the full batch
        "eval_every=0",
        "save_every=0",
        "log_samples=0",
        f"log_dir={config.log_root}/{mode}",
        "on_existing=overwrite",
    ]


def run_mode(config: BenchConfig, mode: str, off_policy: int) -> tuple[dict[str, float], ...]:
    """Runs rl.loop.train, then the raw parts on its trainer and engine: (phase means, raw parts)."""
    from rl.loop.train import Config, run, service_for

    train_config = parse_config(Config, loop_args(config, mode, off_policy))
    service = service_for(train_config)
    try:
        state = run(train_config, service)
        return phase_means(state.history), raw_parts(state, config.raw_reps)
    finally:
        service.close()


def phase_means(history: list[dict[str, Any]]) -> dict[str, float]:
    steady = history[1:] or history
    keys = ("time/step_s", "time/sample_s", "time/wait_sample_s", "time/train_s", "time/sync_s")
    return {key: statistics.mean(s[key] for s in steady) for key in keys}


async def raw_generation(trainer: Any, client: Any, step: int) -> float:
    """The batch's prompts sampled with bare `sample` calls, all in flight at once."""
    from rl.loop.pipeline import batch_builders
    from rl.loop.rollouts import RolloutConfig
    from rl.types import ModelInput

    builders = batch_builders(trainer.train_data, step)
    prompts = []
    for builder in builders:
        envs = await builder.make_envs()
        observation, stop = await envs[0].initial_observation()
        prompts.append((observation, stop, len(envs)))
    rollout: RolloutConfig = trainer.rollout_config
    began = time.perf_counter()
    await asyncio.gather(
        *(
            client.sample(
                ModelInput.from_ints(obs),
                n,
                rollout.sampling_params(stop),
            )
            for obs, stop, n in prompts
        )
    )
    return time.perf_counter() - began


def raw_parts(trainer: Any, reps: int) -> dict[str, float]:
    """Generation, training and sync measured alone, on the loop's own client and engine."""
    from rl.types import AdamParams, Datum, ModelInput

    client = trainer.client
    sampling_client = trainer.client.save_weights_and_get_sampling_client()
    generation, training, syncing = [], [], []
    # Datums shaped like the loop's last batch: its mean length, one per trajectory.
    last = trainer.history[-1]
    n = int(last["optim/num_datums"])
    length = int(last["perf/train_tokens_per_s"] * last["time/train_s"] / max(n, 1))
    datum = Datum.model_validate(
        {
            "model_input": ModelInput.from_ints([1 + i % 1000 for i in range(length)]),
            "loss_fn_inputs": {
                "target_tokens": [2 + i % 1000 for i in range(length)],
                "logprobs": [-1.0] * length,
                "advantages": [0.5] * length,
                "weights": [1.0] * length,
            },
        }
    )
    for rep in range(reps):
        generation.append(asyncio.run(raw_generation(trainer, sampling_client, rep)))
        began = time.perf_counter()
        client.forward_backward([datum] * n, "ppo").result()
        client.optim_step(AdamParams(learning_rate=1e-6)).result()
        training.append(time.perf_counter() - began)
        began = time.perf_counter()
        sampling_client = client.save_weights_and_get_sampling_client()
        syncing.append(time.perf_counter() - began)
    return {
        "raw/generation_s": statistics.mean(generation),
        "raw/train_s": statistics.mean(training),
        "raw/sync_s": statistics.mean(syncing),
    }


def main(argv: list[str]) -> dict[str, Any]:
    import ray

    config = parse_config(BenchConfig, argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    load_before = os.getloadavg()
    try:
        sync, raw = run_mode(config, "sync", 0)
        # Raw parts again, right after the async run: load drift on a shared machine shows
        # up as a difference between the two raw measurements.
        asynchronous, raw_after = run_mode(config, "async", 1)
    finally:
        ray.shutdown()
    raw_sum = raw["raw/generation_s"] + raw["raw/train_s"] + raw["raw/sync_s"]
    figures = {
        "config": dataclasses.asdict(config),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "sync": sync,
        "async": asynchronous,
        **raw,
        "raw/sum_s": raw_sum,
        "raw_after_async": raw_after,
        "overhead_sync_over_raw": sync["time/step_s"] / raw_sum,
        # The loop's own cost beyond its three phases, measured in the same steps (no drift).
        "overhead_sync_over_phases": sync["time/step_s"]
        / (sync["time/sample_s"] + sync["time/train_s"] + sync["time/sync_s"]),
        "async_over_sync": asynchronous["time/step_s"] / sync["time/step_s"],
    }
    print(json.dumps(figures, indent=2))
    print(
        f"sync step {sync['time/step_s']:.2f}s (sample {sync['time/sample_s']:.2f}, "
        f"train {sync['time/train_s']:.2f}, sync {sync['time/sync_s']:.2f}); "
        f"raw parts {raw_sum:.2f}s -> overhead x{figures['overhead_sync_over_raw']:.3f} "
        f"(target <= 1.10); async step {asynchronous['time/step_s']:.2f}s -> "
        f"x{figures['async_over_sync']:.3f} of sync (target <= 0.85)"
    )
    if config.out:
        Path(config.out).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
