"""The GPU check: our trainer engine against a plain peft loop on one GPU, MFU, CPU-vs-GPU
numerics, and the torch sampling engine on the GPU, each measured in the same run.

    bash scripts/gpu_check.sh                                 # on a GPU machine (H100 / H200)
    python bench/gpu_check.py device=cpu shapes=tiny          # tiny shapes on CPU, in CI
    python bench/gpu_check.py --help                          # every key

Written for the device machine: Python 3.12 with torch, transformers and peft but no Ray, no
vLLM, no pydantic (scripts/gpu_check.sh installs carried wheels for that) and no network. So
every model is random-initialised from its config's shapes and written to a temp dir with a
word-level tokenizer made here; the trainer is `trainers.trainer.LoraTrainer`, in-process (its
Ray actor is a thin shell around it).

1. throughput: LoRA r16 (attention + MLP) forward_backward + optim_step tokens/s on the
   Qwen3-0.6B shape (vocabulary 151,936) at 16k and 4k tokens, ours vs a plain peft + AdamW
   loop (HF forward, [tokens, vocab] logits, cross entropy) on the same GPU. Anchor: prime-rl
   13.3k tok/s at 16k on one H100; our target 26k (2x).
2. mfu: the same step on the Qwen3-4B shape. FLOPs per token = 6 x (matmul parameters,
   output head included) + 12 x layers x attention width x sequence (PaLM's count, causal
   masking not subtracted); peak = 989 TFLOP/s bf16 dense on H100/H200 (`peak_tflops` for
   others). Anchor: prime-rl 21.7% (6.2k tok/s on one H100); target >= 40%.
3. numerics: a tiny model in float32 on the device vs on the CPU, same adapter, after one
   optimizer step: target logprobs within 1e-3, and every built-in loss's `loss:sum`.
   With device=cpu both sides are the CPU (the comparison still runs).
4. sampler: the torch engine (samplers/engine_torch.py) on the device, 64 prompts x 128
   tokens, one request at a time as the engine serves them; stops early at
   `sampler_budget_s` and reports the prompts it finished.
5. tenants: 8 tenants' forward_backward calls (LoRA r32, the Qwen3-0.6B shape, 64 rows x 256
   tokens in all) as one shared pass (bench/bench_tenants.py) against one tenant with all the
   rows and against the calls one by one. Targets: >= 0.9x one tenant, >= 3x one by one.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch

from rl.cli import parse_config

ANCHOR_TOKENS_PER_S = 13_300  # prime-rl, Qwen3-0.6B LoRA r16 at 16k, one H100
TARGET_TOKENS_PER_S = 26_000
ANCHOR_MFU, TARGET_MFU = 0.217, 0.40
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}  # bf16 dense, SXM

QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128,
)  # fmt: skip
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)  # fmt: skip
TINY_MFU = {**TINY, "hidden_size": 128, "intermediate_size": 256, "head_dim": 32}


@dataclass(frozen=True)
class Config:
    device: Literal["cuda", "cpu"] = "cuda"
    """where the measured side runs"""
    shapes: Literal["real", "tiny"] = "real"
    """real: Qwen3-0.6B / 4B shapes; tiny: for CI"""
    parts: str = "throughput,mfu,numerics,sampler,tenants"
    """which checks to run, comma-separated"""
    seq_lens: str = "16384,4096"
    """throughput sequence lengths (tiny: 64,32)"""
    mfu_seq_len: int = 4096
    """sequence length of the MFU step (tiny: 64)"""
    steps: int = 3
    """timed steps per measurement, after one warm-up step"""
    rank: int = 16
    """LoRA rank"""
    gradient_checkpointing: bool = False
    """activation checkpointing in our trainer"""
    logprob_chunk_tokens: int | None = None
    """our output-head chunk (None: the default)"""
    sampler_prompts: int = 64
    """sampler: prompts (one request each)"""
    sampler_tokens: int = 128
    """sampler: tokens generated per prompt"""
    sampler_budget_s: float = 120.0
    """sampler: stop starting prompts after this long"""
    peak_tflops: float = 0.0
    """peak bf16 TFLOP/s for MFU; 0 = from the GPU's name"""
    json: str = ""
    """also write the results to this JSON file"""
    seed: int = 0
    """seed of weights and data"""


# -- models ----------------------------------------------------------------------------------


def build_model(path: Path, shape: dict[str, int], device: str, seed: int) -> str:
    """A random-init Qwen3 of `shape` (bfloat16 on GPU, float32 on CPU) and a word-level
    tokenizer over its vocabulary, written to `path`; initialised on `device` (fast)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        **shape,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    del model
    _free_memory()
    _write_tokenizer(path, shape["vocab_size"])
    return str(path)


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    """Token i is the word `t<i>`: enough for the samplers' EOS and stop handling."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", pad_token="t0", eos_token="t1"
    ).save_pretrained(path)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], None], steps: int, device: str) -> float:
    """Seconds per step: one warm-up step, then the mean of `steps`."""
    step()
    _sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - began) / steps


def random_tokens(n: int, vocab_size: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, vocab_size) for _ in range(n)]


# -- 1 + 2: training throughput ----------------------------------------------------------------


def ours_step_s(config: Config, model_dir: str, tokens: list[int], workdir: str) -> float:
    """Seconds per forward_backward + optim_step of our engine on one sequence."""
    from rl.types import AdamParams, Datum, LoraConfig, ModelInput
    from trainers.config import TrainerConfig
    from trainers.trainer import LoraTrainer

    trainer = LoraTrainer(
        model_dir,
        TrainerConfig(
            device=config.device,
            dtype="bfloat16" if config.device == "cuda" else "float32",
            max_tokens_per_batch=len(tokens),
            checkpoint_dir=workdir,
            gradient_checkpointing=config.gradient_checkpointing,
            logprob_chunk_tokens=config.logprob_chunk_tokens,
        ),
    )
    trainer.create_adapter("bench", LoraConfig(rank=config.rank, seed=0, train_unembed=False))
    data = [
        Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
    ]
    params = AdamParams(learning_rate=1e-5)

    def step() -> None:
        trainer.forward_backward("bench", data, "cross_entropy")
        trainer.optim_step("bench", params)

    return timed(step, config.steps, config.device)  # the trainer is freed on return


def plain_step_s(config: Config, model_dir: str, tokens: list[int]) -> float:
    """The baseline: HF model + peft LoRA + AdamW, full [tokens, vocab] logits, cross entropy."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rl.types import LoraConfig
    from trainers.config import TrainerConfig
    from trainers.lora import peft_config

    on_gpu = config.device == "cuda"
    dtype = "bfloat16" if on_gpu else "float32"
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=getattr(torch, dtype),
        attn_implementation=TrainerConfig().resolved_attention(on_gpu, dtype),
    ).to(config.device)
    lora = LoraConfig(rank=config.rank, train_unembed=False)
    model = get_peft_model(model, peft_config(model, lora, 32.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-12)
    ids = torch.tensor([tokens[:-1]], device=config.device)
    labels = torch.tensor(tokens[1:], device=config.device)

    def step() -> None:
        logits = model(input_ids=ids, use_cache=False).logits[0]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, config.steps, config.device)  # the model is freed on return


def throughput(config: Config, workdir: Path) -> list[dict[str, Any]]:
    shape = TINY if config.shapes == "tiny" else QWEN3_0_6B
    model_dir = build_model(workdir / "qwen3-0.6b-shape", shape, config.device, config.seed)
    lengths = [int(n) for n in config.seq_lens.split(",") if n.strip()]
    if config.shapes == "tiny" and config.seq_lens == Config.seq_lens:
        lengths = [64, 32]
    rows = []
    for n in lengths:
        tokens = random_tokens(n + 1, shape["vocab_size"], config.seed)
        ours = n / ours_step_s(config, model_dir, tokens, str(workdir / "ckpt"))
        _free_memory()
        plain = n / plain_step_s(config, model_dir, tokens)
        _free_memory()
        rows.append(
            {
                "seq_len": n,
                "ours_tokens_per_s": ours,
                "plain_tokens_per_s": plain,
                "ours_vs_plain": ours / plain,
                "ours_vs_anchor": ours / ANCHOR_TOKENS_PER_S,
                "ours_vs_target": ours / TARGET_TOKENS_PER_S,
            }
        )
        print(
            f"throughput seq {n}: ours {ours:,.0f} tok/s, plain peft {plain:,.0f} tok/s "
            f"({ours / plain:.2f}x); vs prime-rl anchor 13.3k: {ours / ANCHOR_TOKENS_PER_S:.2f}x, "
            f"vs target 26k: {ours / TARGET_TOKENS_PER_S:.2f}x",
            flush=True,
        )
    return rows


def flops_per_token(shape: dict[str, int], seq_len: int) -> float:
    """6 x matmul parameters (decoder linears + output head) + 12 x L x attention width x T."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    q_width = shape["num_attention_heads"] * shape["head_dim"]
    kv_width = shape["num_key_value_heads"] * shape["head_dim"]
    attention = h * q_width * 2 + h * kv_width * 2  # q, o; k, v
    mlp = 3 * h * shape["intermediate_size"]
    matmul_params = layers * (attention + mlp) + h * shape["vocab_size"]
    return 6.0 * matmul_params + 12.0 * layers * q_width * seq_len


def peak_flops(config: Config) -> float | None:
    if config.peak_tflops > 0:
        return config.peak_tflops * 1e12
    if config.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def mfu(config: Config, workdir: Path) -> dict[str, Any]:
    shape = TINY_MFU if config.shapes == "tiny" else QWEN3_4B
    n = 64 if config.shapes == "tiny" and config.mfu_seq_len == Config.mfu_seq_len else None
    n = n or config.mfu_seq_len
    model_dir = build_model(workdir / "qwen3-4b-shape", shape, config.device, config.seed)
    tokens = random_tokens(n + 1, shape["vocab_size"], config.seed)
    ours = n / ours_step_s(config, model_dir, tokens, str(workdir / "ckpt"))
    _free_memory()
    plain = n / plain_step_s(config, model_dir, tokens)
    _free_memory()
    per_token, peak = flops_per_token(shape, n), peak_flops(config)
    row: dict[str, Any] = {
        "seq_len": n,
        "flops_per_token": per_token,
        "peak_flops": peak,
        "ours_tokens_per_s": ours,
        "plain_tokens_per_s": plain,
        "ours_vs_plain": ours / plain,
        "ours_mfu": ours * per_token / peak if peak else None,
        "plain_mfu": plain * per_token / peak if peak else None,
    }
    if peak:
        print(
            f"mfu (Qwen3-4B shape, seq {n}): ours {row['ours_mfu']:.1%} ({ours:,.0f} tok/s), "
            f"plain peft {row['plain_mfu']:.1%}; vs prime-rl anchor 21.7%: "
            f"{row['ours_mfu'] / ANCHOR_MFU:.2f}x, vs target 40%: {row['ours_mfu'] / TARGET_MFU:.2f}x",
            flush=True,
        )
    else:
        print(f"mfu: ours {ours:,.0f} tok/s, plain {plain:,.0f}; peak unknown (peak_tflops=)")
    return row


# -- 3: numerics -----------------------------------------------------------------------------


def numerics(config: Config, workdir: Path) -> dict[str, Any]:
    """Float32 logprobs and the built-in losses on the device vs on the CPU (same adapter)."""
    from trainers.losses import LOSSES

    model_dir = build_model(workdir / "numerics", TINY, "cpu", config.seed)
    cpu = _numerics_trainer(model_dir, "cpu", workdir)
    device = _numerics_trainer(model_dir, config.device, workdir)  # the CPU again on CPU
    rng = torch.Generator().manual_seed(config.seed)
    seqs = [random_tokens(n + 1, TINY["vocab_size"], config.seed + n) for n in (17, 40, 9)]
    base = cpu.forward("n", _datums(seqs, None, rng), "cross_entropy")
    sampler_logprobs = [o["logprobs"].to_torch() for o in base.loss_fn_outputs]
    data = _datums(seqs, sampler_logprobs, rng)
    logprob_diff, losses = 0.0, {}
    for name in LOSSES:
        on_cpu = cpu.forward("n", data if name != "cross_entropy" else _ce(data), name)
        on_dev = device.forward("n", data if name != "cross_entropy" else _ce(data), name)
        for a, b in zip(on_cpu.loss_fn_outputs, on_dev.loss_fn_outputs, strict=True):
            diff = (a["logprobs"].to_torch() - b["logprobs"].to_torch()).abs().max()
            logprob_diff = max(logprob_diff, float(diff))
        want, got = on_cpu.metrics["loss:sum"], on_dev.metrics["loss:sum"]
        losses[name] = {"cpu": want, "device": got, "rel_diff": abs(got - want) / abs(want)}
    result = {
        "compared": f"{config.device} vs cpu",
        "max_logprob_diff": logprob_diff,
        "logprobs_ok": logprob_diff <= 1e-3,
        "losses": losses,
        "losses_ok": all(v["rel_diff"] <= 1e-3 for v in losses.values()),
    }
    print(
        f"numerics ({result['compared']}, float32): max |logprob diff| {logprob_diff:.2e} "
        f"(<= 1e-3: {result['logprobs_ok']}); losses equal within 1e-3: {result['losses_ok']} "
        + ", ".join(f"{k} {v['rel_diff']:.1e}" for k, v in losses.items()),
        flush=True,
    )
    return result


def _numerics_trainer(model_dir: str, device: str, workdir: Path) -> Any:
    """A float32 trainer whose adapter took one optimizer step (so LoRA B is not zero)."""
    from rl.types import AdamParams, LoraConfig
    from trainers.config import TrainerConfig
    from trainers.trainer import LoraTrainer

    trainer = LoraTrainer(
        model_dir,
        TrainerConfig(device=device, dtype="float32", checkpoint_dir=str(workdir / "ckpt")),
    )
    trainer.create_adapter("n", LoraConfig(rank=8, seed=1))
    seqs = [random_tokens(33, TINY["vocab_size"], 7)]
    trainer.forward_backward("n", _ce(_datums(seqs, None, None)), "cross_entropy")
    trainer.optim_step("n", AdamParams(learning_rate=1e-2))
    return trainer


def _datums(seqs: list[list[int]], sampler_logprobs: Any, rng: Any) -> list[Any]:
    """RL datums (sampler logprobs near the model's, random advantages), or plain ones."""
    from rl.types import Datum, ModelInput

    out = []
    for i, s in enumerate(seqs):
        n = len(s) - 1
        inputs: dict[str, Any] = {"target_tokens": s[1:], "weights": [1.0] * n}
        if sampler_logprobs is not None:
            noise = 0.1 * torch.randn(n, generator=rng)
            inputs["logprobs"] = (sampler_logprobs[i] + noise).tolist()
            inputs["advantages"] = torch.randn(n, generator=rng).tolist()
        out.append(Datum(model_input=ModelInput.from_ints(s[:-1]), loss_fn_inputs=inputs))
    return out


def _ce(data: list[Any]) -> list[Any]:
    """The same datums with the cross-entropy inputs only."""
    from rl.types import Datum

    keep = ("target_tokens", "weights")
    return [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items() if k in keep},
        )
        for d in data
    ]


# -- 4: the torch sampling engine ------------------------------------------------------------


def sampler(config: Config, workdir: Path) -> dict[str, Any]:
    from rl.types import SamplingParams
    from samplers.config import SamplerConfig
    from samplers.engine_torch import TorchEngine
    from samplers.types import SampleRequest

    shape = TINY if config.shapes == "tiny" else QWEN3_0_6B
    model_dir = workdir / "qwen3-0.6b-shape"
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, shape, config.device, config.seed)
    prompts = 4 if config.shapes == "tiny" and config.sampler_prompts == 64 else None
    prompts = prompts or config.sampler_prompts
    tokens = 8 if config.shapes == "tiny" and config.sampler_tokens == 128 else None
    tokens = tokens or config.sampler_tokens
    engine = TorchEngine(str(model_dir), SamplerConfig(engine="torch", max_model_len=1024))

    def request(i: int) -> SampleRequest:
        return SampleRequest(
            request_id=f"r{i}",
            prompt=random_tokens(16, shape["vocab_size"], config.seed + i),
            num_samples=1,
            params=SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, stop=[]),
            max_tokens=tokens,
        )

    async def run() -> tuple[int, int, float]:
        await engine.sample(request(-1))  # warm-up
        began, done, generated = time.perf_counter(), 0, 0
        while done < prompts and time.perf_counter() - began < config.sampler_budget_s:
            response = await engine.sample(request(done))
            generated += len(response.sequences[0].tokens)
            done += 1
        return done, generated, time.perf_counter() - began

    done, generated, seconds = asyncio.run(run())
    engine.shutdown()
    row = {
        "engine_device": engine.info.device,
        "prompts": done,
        "prompts_asked": prompts,
        "tokens": generated,
        "tokens_per_s": generated / seconds,
    }
    print(
        f"sampler (torch engine on {engine.info.device}): {row['tokens_per_s']:,.0f} tok/s over "
        f"{done}/{prompts} prompts x {tokens} tokens, one request at a time",
        flush=True,
    )
    return row


def tenants(config: Config, workdir: Path) -> list[dict[str, Any]]:
    """Shared passes of 1, 2, 4, 8 tenants (bench/bench_tenants.py) on the device."""
    from bench.bench_tenants import measure_tenants

    shape = TINY if config.shapes == "tiny" else QWEN3_0_6B
    model_dir = build_model(workdir / "qwen3-0.6b-tenants", shape, config.device, config.seed)
    rows, tokens = (8, 32) if config.shapes == "tiny" else (64, 256)
    trainer_config = {"device": config.device, "checkpoint_dir": str(workdir / "ckpt-tenants")}
    results = measure_tenants(
        model_dir, trainer_config, [1, 2, 4, 8], rows, tokens, 32, config.steps,
        sync=lambda: _sync(config.device), vocab_size=shape["vocab_size"],
    )  # fmt: skip
    for r in results:
        print(
            f"tenants {r['tenants']:.0f}: shared {r['shared']:,.0f} tok/s = "
            f"{r['shared_vs_one_tenant']:.2f}x one tenant (target >= 0.9), "
            f"{r['shared_vs_one_by_one']:.2f}x one by one (target >= 3 at 8)",
            flush=True,
        )
    return results


PARTS: dict[str, Callable[[Config, Path], Any]] = {
    "throughput": throughput,
    "mfu": mfu,
    "numerics": numerics,
    "sampler": sampler,
    "tenants": tenants,
}


def main(argv: list[str]) -> dict[str, Any]:
    config = parse_config(Config, argv)
    parts = [p.strip() for p in config.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"parts={config.parts!r}: unknown {unknown}; known: {sorted(PARTS)}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device=cuda but torch sees no GPU (device=cpu for the CPU run)")
    name = torch.cuda.get_device_name() if config.device == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}, shapes={config.shapes}", flush=True)
    results: dict[str, Any] = {"config": asdict(config), "device_name": name}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for part in parts:
            started = time.perf_counter()
            results[part] = PARTS[part](config, Path(tmp))
            results.setdefault("seconds", {})[part] = time.perf_counter() - started
            _free_memory()
    results["seconds"]["total"] = time.perf_counter() - began
    print(f"gpu_check done in {results['seconds']['total']:.0f} s", flush=True)
    if config.json:
        Path(config.json).write_text(json.dumps(results, indent=2, default=_json_default))
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    main(sys.argv[1:])
