"""The cost of the wire: the official `tinker` SDK -> HTTP server vs the in-process client API.

    .venv/bin/python bench/bench_server.py       # SmolLM2-135M-Instruct, LoRA r32, vLLM sampler

Both contenders drive the same engine (one ServiceClient: the same trainer actor and the same
sampler pool), alternating round by round, so the ratio is the server's overhead alone:

1. `forward_backward` + `optim_step` tokens/s on 8 x 128 tokens (two adapters of the same
   seed, one per path). Target >= 0.90x.
2. Sampling tokens/s, 64 prompts x 64 tokens (EOS off, so both paths make the same number of
   tokens) from the base model. Target >= 0.90x.
3. Latency of one small `forward_backward` (1 x 16 tokens): p50 / p99 through each path.
"""

from __future__ import annotations

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
    """model to train and sample"""
    rank: int = 32
    """LoRA rank"""
    trainer_dtype: str = "float32"
    """trainer base-weight dtype"""
    sampler_engine: str = "auto"
    """auto | vllm | torch"""
    train_rounds: int = 4
    """timed training steps per path (after one warm-up each)"""
    sample_rounds: int = 3
    """timed sampling rounds per path (after one warm-up each)"""
    prompts: int = 64
    """prompts per sampling round"""
    new_tokens: int = 64
    """tokens sampled per prompt"""
    latency_calls: int = 40
    """small forward_backward round trips per path"""
    seed: int = 0
    """data seed"""


Pair = tuple[list[float], list[float]]  # (in-process, SDK + HTTP)


def batch_tokens(seed: int, rows: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(49152) for _ in range(length + 1)] for _ in range(rows)]


def as_data(module, rows: list[list[int]]) -> list:
    return [
        module.Datum(
            model_input=module.ModelInput.from_ints(r[:-1]),
            loss_fn_inputs={"target_tokens": r[1:], "weights": [1.0] * (len(r) - 1)},
        )
        for r in rows
    ]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(config: Config) -> None:
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    warnings.simplefilter("ignore", FutureWarning)
    import logging

    logging.getLogger("tinker").setLevel(logging.ERROR)
    import tinker

    print(f"config: {asdict(config)}")
    service, running, key = start_server(config)
    try:
        sdk = tinker.ServiceClient(base_url=running.url, api_key=key)
        local = service.create_lora_training_client(config.base_model, rank=config.rank, seed=1)
        remote = sdk.create_lora_training_client(
            config.base_model, rank=config.rank, seed=1
        ).result()
        train_s = measure_training(config, local, remote)  # 1.
        latency_s = measure_latency(config, local, remote)  # 3.
        sample_rates = measure_sampling(config, service, sdk)  # 2.
    finally:
        running.stop()
        service.close()
    report(config, train_s, sample_rates, latency_s)


def start_server(config: Config) -> tuple[Any, Any, str]:
    """The in-process service and the HTTP server in front of it: (service, running server,
    API key)."""
    from rl.server import ServerConfig, build_service, start_in_thread
    from rl.server.keys import KeyStore
    from samplers.config import SamplerConfig
    from trainers.config import TrainerConfig

    home = tempfile.mkdtemp(prefix="bench-server-")
    server_config = ServerConfig(
        port=0,
        home=home,
        models=config.base_model,
        trainer=TrainerConfig(dtype=config.trainer_dtype),  # type: ignore[arg-type]
        sampler=SamplerConfig(
            engine=config.sampler_engine,  # type: ignore[arg-type]
            max_lora_rank=max(32, config.rank),
        ),
    )
    key = KeyStore(server_config.resolved_keys_file()).add("bench")
    service = build_service(server_config)
    return service, start_in_thread(server_config, service), key


def measure_training(config: Config, local: Any, remote: Any) -> Pair:
    """1. Seconds per forward_backward + optim_step on 8 x 128 tokens, alternating."""
    from tinker import types as tt

    from rl import types as rt

    adam_local, adam_remote = (
        rt.AdamParams(learning_rate=1e-5),
        tt.AdamParams(learning_rate=1e-5),
    )

    def step(client, module, adam, seed):
        data = as_data(module, batch_tokens(seed, 8, 128))
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(adam)
        fb.result(), opt.result()

    step(local, rt, adam_local, -1), step(remote, tt, adam_remote, -1)  # warm-up
    local_s, remote_s = [], []
    for r in range(config.train_rounds):
        local_s.append(timed(lambda r=r: step(local, rt, adam_local, r)))
        remote_s.append(timed(lambda r=r: step(remote, tt, adam_remote, r)))
    return local_s, remote_s


def measure_latency(config: Config, local: Any, remote: Any) -> Pair:
    """3. Seconds per small forward_backward (1 x 16 tokens), alternating."""
    from tinker import types as tt

    from rl import types as rt

    small_local = as_data(rt, batch_tokens(99, 1, 16))
    small_remote = as_data(tt, batch_tokens(99, 1, 16))
    lat_local, lat_remote = [], []
    for _ in range(config.latency_calls):
        lat_local.append(
            timed(lambda: local.forward_backward(small_local, "cross_entropy").result())
        )
        lat_remote.append(
            timed(lambda: remote.forward_backward(small_remote, "cross_entropy").result())
        )
    return lat_local, lat_remote


def measure_sampling(config: Config, service: Any, sdk: Any) -> Pair:
    """2. Sampling tokens/s from the base model, alternating."""
    from tinker import types as tt

    from rl import types as rt

    base_local = service.create_sampling_client(base_model=config.base_model)
    base_remote = sdk.create_sampling_client(base_model=config.base_model).result()
    prompts = batch_tokens(7, config.prompts, 16)

    def sample(client, module) -> int:
        params = module.SamplingParams(max_tokens=config.new_tokens, temperature=1.0, stop=[])
        futures = [
            client.sample(module.ModelInput.from_ints(p), num_samples=1, sampling_params=params)
            for p in prompts
        ]
        return sum(len(f.result().sequences[0].tokens) for f in futures)

    sample(base_local, rt), sample(base_remote, tt)  # warm-up
    local_rates, remote_rates = [], []
    for _ in range(config.sample_rounds):
        start = time.perf_counter()
        n = sample(base_local, rt)
        local_rates.append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        n = sample(base_remote, tt)
        remote_rates.append(n / (time.perf_counter() - start))
    return local_rates, remote_rates


def report(config: Config, train_s: Pair, sample_rates: Pair, latency_s: Pair) -> None:
    """Prints the three measurements, each path and the ratio SDK / in-process."""
    local_s, remote_s = train_s
    tokens = 8 * 128
    train_local, train_remote = tokens / min(local_s), tokens / min(remote_s)
    local_rates, remote_rates = sample_rates
    lat_local, lat_remote = latency_s
    ms = lambda xs: " ".join(f"{x * 1000:.0f}" for x in xs)  # noqa: E731
    print(
        f"\n1. forward_backward + optim_step, 8 x 128, LoRA r{config.rank} (best of {config.train_rounds})"
    )
    print(f"   in-process  {train_local:8.1f} tok/s   step ms: {ms(local_s)}")
    print(f"   SDK + HTTP  {train_remote:8.1f} tok/s   step ms: {ms(remote_s)}")
    print(f"   ratio SDK / in-process: {train_remote / train_local:.3f}x (target >= 0.90)")
    print(
        f"\n2. sampling, {config.prompts} prompts x {config.new_tokens} tokens (best of {config.sample_rounds})"
    )
    print(
        f"   in-process  {max(local_rates):8.1f} tok/s   rounds: {' '.join(f'{x:.0f}' for x in local_rates)}"
    )
    print(
        f"   SDK + HTTP  {max(remote_rates):8.1f} tok/s   rounds: {' '.join(f'{x:.0f}' for x in remote_rates)}"
    )
    print(
        f"   ratio SDK / in-process: {max(remote_rates) / max(local_rates):.3f}x (target >= 0.90)"
    )
    print(f"\n3. one small forward_backward (1 x 16 tokens), {config.latency_calls} calls")
    for name, values in (("in-process", lat_local), ("SDK + HTTP", lat_remote)):
        print(
            f"   {name:10s}  p50 {percentile(values, 0.5) * 1000:6.1f} ms   "
            f"p99 {percentile(values, 0.99) * 1000:6.1f} ms   mean {statistics.mean(values) * 1000:6.1f} ms"
        )


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
