"""Where a merged-mode weight sync of the main job goes, and the adapter's transport A/B.

    .venv/bin/python bench/bench_sync.py              # rl.loop.train's preset (r16, merged, vLLM)
    .venv/bin/python bench/bench_sync.py syncs=10 train_unembed=false

1. Phases, on `rl.loop.train`'s own trainer and sampler configs: `syncs` times, one
   `forward_backward` + `optim_step` on 16 random 40-token datums, then
   `save_weights_and_get_sampling_client`, split as the sync's metrics report it:
   trainer side (adapter export and the trainer's probe forward, queued together),
   merge (the sampler merging the adapter into its base copy, on the engine's thread), reload
   (the engine taking the merged tensors: on CPU vLLM, repacked straight into its linear
   layers, `samplers/vllm_swap.py`), verify (the sampler's probe logprobs vs the trainer's).
2. Transport: the same adapter, as the trainer exports it (`rl.packed.PackedTensors`, one flat
   buffer) and as a dict of tensors (before), through `ray.put` and a task that reads it, in
   alternating rounds; prints packed / dict.

Memory bandwidth (a 512 MB copy) is printed before and after: it is what a sync is bound by,
and on a shared machine it was seen to vary 3x within minutes. Compare within one run.
"""

from __future__ import annotations

import random
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
    syncs: int = 6
    """timed syncs (after an untimed first one)"""
    transport_rounds: int = 6
    """rounds of the transport A/B"""
    train_unembed: bool = True
    """LoRA on the output head too (rl.loop.train's key)"""


def memory_bandwidth_gbs() -> float:
    import torch

    source = torch.ones(128 * 1024 * 1024)
    target = torch.empty_like(source)
    target.copy_(source)
    start = time.perf_counter()
    for _ in range(3):
        target.copy_(source)
    return 3 * 2 * source.numel() * 4 / (time.perf_counter() - start) / 1e9


def main(config: BenchConfig) -> None:
    import ray

    import rl
    from rl.loop.train import Config as TrainConfig

    print(f"memory bandwidth before: {memory_bandwidth_gbs():.1f} GB/s", flush=True)
    preset = parse_config(TrainConfig, [])
    trainer_config, sampler_config = preset.actor_configs()
    service = rl.ServiceClient(trainer_config=trainer_config, sampler_config=sampler_config)
    client = service.create_lora_training_client(
        preset.base_model, rank=preset.rank, train_unembed=config.train_unembed
    )
    phases = measure_syncs(config, client)
    times, packed = measure_transport(config, client)
    ray.shutdown()
    report(config, phases, times, packed)


def measure_syncs(config: BenchConfig, client: Any) -> dict[str, list[float]]:
    """1. Seconds of each phase of `syncs` merged-mode syncs, each after a training step (the
    first sync, untimed, left out); prints every sync as it ends."""
    from rl import types

    rng = random.Random(0)

    def step() -> None:
        data = []
        for _ in range(16):
            tokens = [rng.randrange(1000, 5000) for _ in range(40)]
            data.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 39},
                )
            )
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    phases: dict[str, list[float]] = {}
    for index in range(config.syncs + 1):
        step()
        began = time.perf_counter()
        sampling = client.save_weights_and_get_sampling_client()
        wall = time.perf_counter() - began
        m = sampling.sync_metrics
        load, verify = m["time/sync_load_s"], m["time/sync_verify_s"]
        merge = m.get("time/sync_merge_s", 0.0)  # absent when the sampler skipped the reload
        row = {
            "wall": wall,
            "trainer side": m["time/sync_s"] - load,  # sync_s: up to the load, not the check
            "merge": merge,
            "reload": load - merge,
            "verify": verify,
        }
        print(f"sync {index}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        if index:
            for key, value in row.items():
                phases.setdefault(key, []).append(value)
    return phases


def measure_transport(config: BenchConfig, client: Any) -> tuple[dict[str, list[float]], Any]:
    """2. Seconds of `ray.put` + a remote read of the adapter, as a dict of tensors and
    packed, in alternating rounds; and the packed adapter."""
    import ray

    from rl.packed import PackedTensors

    @ray.remote(num_cpus=0)  # the actors hold every CPU
    def read(value: object) -> int:
        return len(value[1])  # type: ignore[index]

    adapter_config, packed = ray.get(client.trainer_actor.adapter_weights.remote(client.model_id))
    as_dict = {k: v.clone() for k, v in packed.items()}
    # Each as the trainer makes it from the live weights: one copy.
    makers = {
        "dict": lambda: {k: v.clone() for k, v in as_dict.items()},
        "packed": lambda: PackedTensors.pack(as_dict),
    }
    times: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(config.transport_rounds):
        for name, make in makers.items():
            began = time.perf_counter()
            ray.get(read.remote(ray.put((adapter_config, make()))))
            times[name].append(time.perf_counter() - began)
    return times, packed


def report(
    config: BenchConfig, phases: dict[str, list[float]], times: dict[str, list[float]], packed: Any
) -> None:
    """Prints the sync phases' medians, the transport A/B, and the memory bandwidth now."""
    print(f"\nmerged-mode sync, medians of {config.syncs} (first left out), seconds:")
    for key, values in phases.items():
        print(f"  {key:<13} {statistics.median(values):.3f}  (min {min(values):.3f})")
    size_mb = packed.flat.nbytes / 1e6
    packed_s, dict_s = statistics.median(times["packed"]), statistics.median(times["dict"])
    print(f"\nadapter transport ({len(packed)} tensors, {size_mb:.1f} MB), put + remote read:")
    print(f"  dict of tensors {dict_s:.3f} s, packed {packed_s:.3f} s: {packed_s / dict_s:.2f}x")
    print(f"memory bandwidth after: {memory_bandwidth_gbs():.1f} GB/s")


if __name__ == "__main__":
    main(parse_config(BenchConfig, sys.argv[1:]))
