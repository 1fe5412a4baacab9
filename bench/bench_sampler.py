"""Sampler throughput, weight-sync latency and sampler/trainer logprob agreement, in one run.

    .venv/bin/python bench/bench_sampler.py            # SmolLM2-135M-Instruct, LoRA r32

1. Throughput: the same 64 chat prompts x 64 new tokens (EOS ignored, per-prompt seeds,
   logprob of every sampled token) through raw `vllm.LLM.generate` (in a child process of its
   own, detokenization off: the strictest baseline) and through `SamplingClient.sample`
   (64 concurrent futures, one Ray sampler actor), in alternating rounds so that load from
   other users of the machine hits both alike. Target: API >= 0.95x raw. The same prompts
   are then sampled from a trained LoRA r32 policy synced in adapter mode (vLLM LoRA kernels)
   and in merged mode: the numbers behind the per-device default `sync_mode`.
2. Sync latency, adapter and merged mode, LoRA r32 after an optim step:
   `time/sync_s` (trainer export -> every actor serves it) and the probe check on top.
   Targets: adapter <= 200 ms, merged <= 4 s.
3. Sampler vs trainer logprobs of the same sequences with the same weights (the trained
   policy; 16 of the sampled sequences): mean and max |difference|, float32 and bfloat16.
   Target: mean <= 0.01 nats in float32.

Both contenders use the same thread count. The machine may be shared: compare ratios.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from rl.cli import parse_config

TOPICS = [
    "the ocean", "a lighthouse", "volcanoes", "a lost key", "autumn", "robots", "the moon",
    "a small town", "bees", "winter mornings", "a library", "trains", "mountains", "coffee",
    "an old map",
]  # fmt: skip


@dataclass(frozen=True)
class Config:
    base_model: str = "SmolLM2-135M-Instruct"
    """model to sample from and train"""
    prompts: int = 64
    """prompts per throughput run"""
    new_tokens: int = 64
    """tokens generated per prompt"""
    rank: int = 32
    """LoRA rank of the trained policy"""
    threads: int = 2
    """torch threads for every engine and the trainer"""
    kv_cache_gib: float = 0.5
    """vLLM KV cache per engine, GiB (64 x ~100 tokens need 0.3)"""
    rounds: int = 3
    """alternating raw / client throughput rounds"""
    sync_repeats: int = 3
    """timed syncs per mode (after an untimed first one)"""
    score_sequences: int = 16
    """sequences scored by sampler and trainer"""
    bf16: bool = True
    """also measure the logprob agreement in bfloat16"""


def chat_prompts(model_dir: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for i in range(n):
        kind = ("a short poem", "a two-line story", "three facts", "a haiku")[i % 4]
        messages = [{"role": "user", "content": f"Write {kind} about {TOPICS[i % len(TOPICS)]}."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def raw_vllm(config: Config, model_dir: str, prompts: list[list[int]], pipe: Any) -> None:
    """The baseline, in a child process: one `LLM.generate` over all prompts per "run" sent."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch

    torch.set_num_threads(config.threads)
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    max_len = min(
        2048, getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", 2048)
    )
    llm = LLM(
        model_dir,
        dtype="float32",
        max_model_len=max_len,
        kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
        enable_prefix_caching=True,
        seed=0,
    )
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def params(seed: int) -> Any:
        return SamplingParams(
            max_tokens=config.new_tokens, temperature=1.0, seed=seed, logprobs=0,
            ignore_eos=True, detokenize=False,
        )  # fmt: skip

    llm.generate(inputs[:8], [params(i) for i in range(8)], use_tqdm=False)  # warm-up
    pipe.send("ready")
    while pipe.recv() == "run":
        start = time.perf_counter()
        outputs = llm.generate(inputs, [params(i) for i in range(len(inputs))], use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(o.outputs[0].logprobs for o in outputs)
        pipe.send({"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)})


def paired_throughput(config: Config, model_dir: str, prompts: list[list[int]], client: Any) -> Any:
    """Raw and client runs alternated `rounds` times, so load drift on a shared machine hits
    both alike; returns both lists of runs."""
    ctx = mp.get_context("spawn")
    parent, child_end = ctx.Pipe()
    child = ctx.Process(target=raw_vllm, args=(config, model_dir, prompts, child_end))
    child.start()
    if not parent.poll(900) or parent.recv() != "ready":
        raise RuntimeError("the raw vLLM baseline did not start")
    raw, api = [], []
    timed_sampling(client, prompts, config.new_tokens)  # warm-up
    for _ in range(config.rounds):
        parent.send("run")
        raw.append(parent.recv())
        api.append(timed_sampling(client, prompts, config.new_tokens, warm_up=False))
    parent.send("stop")
    child.join()
    return raw, api


def timed_sampling(
    client: Any, prompts: list[list[int]], new_tokens: int, warm_up: bool = True
) -> dict[str, Any]:
    """All prompts as concurrent `sample` futures; tokens/s and outputs."""
    from rl.types import ModelInput, SamplingParams

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=seed, stop=[])

    for future in (
        []
        if not warm_up
        else [
            client.sample(ModelInput.from_ints(p), 1, params(i)) for i, p in enumerate(prompts[:8])
        ]
    ):
        future.result()
    start = time.perf_counter()
    futures = [client.sample(ModelInput.from_ints(p), 1, params(i)) for i, p in enumerate(prompts)]
    responses = [f.result() for f in futures]
    seconds = time.perf_counter() - start
    tokens = sum(len(r.sequences[0].tokens) for r in responses)
    assert all(len(r.sequences[0].logprobs) == len(r.sequences[0].tokens) for r in responses)
    sequences = [p + r.sequences[0].tokens for p, r in zip(prompts, responses, strict=True)]
    return {"seconds": seconds, "tokens": tokens, "sequences": sequences}


def train_step(training_client: Any, sequences: list[list[int]]) -> None:
    from rl.types import AdamParams

    training_client.forward_backward([datum(s) for s in sequences], "cross_entropy")
    training_client.optim_step(AdamParams(learning_rate=1e-4)).result()


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in values) + "]"


def datum(tokens: list[int]) -> Any:
    from rl.loop.datums import supervised_datum

    return supervised_datum(tokens, [1.0] * len(tokens))


def logprob_agreement(
    training_client: Any, client: Any, sequences: list[list[int]]
) -> dict[str, float]:
    """Mean and max |sampler - trainer| over every position of `sequences`."""
    from rl.types import ModelInput

    trainer = training_client.forward([datum(s) for s in sequences]).result()
    futures = [client.compute_logprobs(ModelInput.from_ints(s)) for s in sequences]
    diffs = []
    for future, output in zip(futures, trainer.loss_fn_outputs, strict=True):
        sampled = future.result()[1:]
        diffs += [abs(a - b) for a, b in zip(sampled, output["logprobs"].tolist(), strict=True)]
    return {"mean": statistics.fmean(diffs), "max": max(diffs), "positions": len(diffs)}


def service_for(config: Config, dtype: str) -> Any:
    import rl
    from samplers.config import SamplerConfig, vllm_lora_rank
    from trainers import TrainerConfig

    return rl.ServiceClient(
        trainer_config=TrainerConfig(dtype=dtype, num_threads=config.threads),  # type: ignore[arg-type]
        sampler_config=SamplerConfig(
            engine="vllm",
            dtype=dtype,
            num_threads=config.threads,
            kv_cache_gib=config.kv_cache_gib,
            max_lora_rank=vllm_lora_rank(config.rank),
            # Measure, do not judge: the probe check's verdict is tested elsewhere.
            sync_tolerance=1.0,
        ),
        num_cpus=8,
    )


def close_pool(service: Any, client: Any) -> None:
    """Stops the sampler actors behind `client` (frees their memory for the next engine)."""
    service.pools.drop(client.pool)


def sync_latency(
    training_client: Any, mode: str, repeats: int, batch: list[list[int]]
) -> dict[str, Any]:
    training_client.save_weights_and_get_sampling_client(sync_mode=mode)  # starts the pool
    pushes, verifies, totals = [], [], []
    client = None
    for _ in range(repeats):
        train_step(training_client, batch)
        start = time.perf_counter()
        client = training_client.save_weights_and_get_sampling_client(sync_mode=mode)
        totals.append(time.perf_counter() - start)
        pushes.append(client.sync_metrics["time/sync_s"])
        verifies.append(client.sync_metrics["time/sync_verify_s"])
    return {
        "push_s": statistics.median(pushes),
        "best_push_s": min(pushes),
        "verify_s": statistics.median(verifies),
        "total_s": statistics.median(totals),
        "diff_mean": client.sync_metrics["sync/logprob_diff_mean"] if client else None,
        "client": client,
    }


def main(config: Config) -> None:
    from rl.models import resolve_model

    print(f"config: {asdict(config)}")
    model_dir = resolve_model(config.base_model)
    prompts = chat_prompts(model_dir, config.prompts)
    # Engines are closed once measured: the machine has 24 GiB, shared.
    service = service_for(config, "float32")
    base = service.create_sampling_client(base_model=config.base_model)
    raw_runs, api_runs = paired_throughput(config, model_dir, prompts, base)
    close_pool(service, base)
    api = api_runs[-1]
    batch = api["sequences"][:8]
    scored = api["sequences"][: config.score_sequences]
    syncs, agreement, runs = trained_float32(config, service, prompts, batch, scored)
    service.close()
    if config.bf16:
        agreement.update(bfloat16_agreement(config, batch, scored))
    report_throughput(config, raw_runs, api_runs, runs)
    report_syncs(config, syncs)
    report_agreement(config, agreement, len(scored))


def trained_float32(
    config: Config,
    service: Any,
    prompts: list[list[int]],
    batch: list[list[int]],
    scored: list[list[int]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A LoRA policy trained on `batch` and synced in each mode, in float32: (sync latency,
    logprob agreement on `scored`, throughput on `prompts`), each by mode."""
    training_client = service.create_lora_training_client(
        config.base_model, rank=config.rank, seed=0
    )
    syncs, agreement, runs = {}, {}, {}
    for mode in ("adapter", "merged"):
        syncs[mode] = sync_latency(training_client, mode, config.sync_repeats, batch)
        client = syncs[mode]["client"]  # the trainer's current weights
        agreement[f"float32 {mode}"] = logprob_agreement(training_client, client, scored)
        runs[mode] = timed_sampling(client, prompts, config.new_tokens)
        close_pool(service, client)
    return syncs, agreement, runs


def bfloat16_agreement(
    config: Config, batch: list[list[int]], scored: list[list[int]]
) -> dict[str, Any]:
    """The logprob agreement in bfloat16, after one step on `batch`, by mode."""
    agreement: dict[str, Any] = {}
    service = service_for(config, "bfloat16")
    bf16_client = service.create_lora_training_client(config.base_model, rank=config.rank, seed=0)
    train_step(bf16_client, batch)
    for mode in ("adapter", "merged"):
        client = bf16_client.save_weights_and_get_sampling_client(sync_mode=mode)
        agreement[f"bfloat16 {mode}"] = logprob_agreement(bf16_client, client, scored)
        close_pool(service, client)
    service.close()
    return agreement


def rate(run: dict[str, Any]) -> float:
    return run["tokens"] / run["seconds"]


def report_throughput(
    config: Config, raw_runs: list[Any], api_runs: list[Any], runs: dict[str, Any]
) -> None:
    lora_run, merged_run = runs["adapter"], runs["merged"]
    raw_rates = [rate(r) for r in raw_runs]
    api_rates = [rate(r) for r in api_runs]
    ratios = [a / r for a, r in zip(api_rates, raw_rates, strict=True)]
    print(f"\nthroughput, {config.prompts} prompts x {config.new_tokens} tokens, with logprobs")
    print(f"({config.rounds} alternating rounds; best, and each round):")
    print(f"  raw vllm.LLM.generate         {max(raw_rates):8.1f} tok/s   {_fmt(raw_rates)}")
    print(f"  SamplingClient (base model)   {max(api_rates):8.1f} tok/s   {_fmt(api_rates)}")
    print(
        f"  ratio client / raw  best-to-best {max(api_rates) / max(raw_rates):6.3f}x, "
        f"median of rounds {statistics.median(ratios):6.3f}x   (target >= 0.95)"
    )
    print(
        f"  trained r{config.rank}, adapter mode     {rate(lora_run):8.1f} tok/s  (vLLM LoRA kernels)"
    )
    print(f"  trained r{config.rank}, merged mode      {rate(merged_run):8.1f} tok/s")


def report_syncs(config: Config, syncs: dict[str, Any]) -> None:
    adapter, merged = syncs["adapter"], syncs["merged"]
    print(f"\nweight sync, LoRA r{config.rank}, median of {config.sync_repeats} (best push):")
    for name, result in (("adapter", adapter), ("merged", merged)):
        target = "0.2" if name == "adapter" else "4"
        print(
            f"  {name:8s} push {result['push_s'] * 1000:7.1f} ms ({result['best_push_s'] * 1000:7.1f})"
            f"   + probe check {result['verify_s'] * 1000:6.1f} ms"
            f"   = {result['total_s'] * 1000:7.1f} ms   (target push <= {target} s)"
        )


def report_agreement(config: Config, agreement: dict[str, Any], n_scored: int) -> None:
    print(
        f"\nsampler vs trainer logprobs, {n_scored} sequences, same weights (trained r{config.rank}):"
    )
    for name, result in agreement.items():
        print(
            f"  {name:17s} mean {result['mean']:.2e}   max {result['max']:.2e} nats"
            f"   ({result['positions']} positions)"
        )
    print("  target: float32 mean <= 1e-2")


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
