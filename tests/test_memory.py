"""Model calls sized from the memory the trainer has (trainers/memory.py): a batch far beyond one
call's memory completes, split into calls, with the same sums as fewer, larger calls."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rl import types
from trainers import LoraTrainer, TrainerConfig
from trainers.memory import GIB, MemoryBudget, ModelShape, bytes_per_token

SMOLLM2 = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, vocab=49152, param_bytes=0)


def test_the_estimate_matches_what_smollm2_measured():
    """SmolLM2-135M in float32 on CPU measured 2.2-2.7 MB per token at S = 128-512."""
    at_128 = bytes_per_token(SMOLLM2, 128, act_bytes=4, head_chunk=0)
    at_512 = bytes_per_token(SMOLLM2, 512, act_bytes=4, head_chunk=0)
    assert 2.0e6 < at_128 < 2.8e6 and at_128 < at_512 < 3.2e6
    # A chunked output head holds no per-token vocabulary rows; bfloat16 halves the rest.
    chunked = bytes_per_token(SMOLLM2, 128, act_bytes=4, head_chunk=2048)
    assert at_128 - chunked == pytest.approx(4 * 3 * 49152)
    assert bytes_per_token(SMOLLM2, 128, act_bytes=2, head_chunk=2048) == pytest.approx(chunked / 2)


def test_the_budget_follows_the_limit_and_learns_upward():
    rss = _status("VmRSS")
    shape = ModelShape(layers=2, hidden=128, intermediate=256, heads=4, vocab=49152, param_bytes=0)
    small = MemoryBudget(shape, torch.device("cpu"), 4, 0, limit_bytes=rss + GIB // 2)
    large = MemoryBudget(shape, torch.device("cpu"), 4, 0, limit_bytes=rss + 2 * GIB)
    assert 1 < small.tokens_per_call(128) < large.tokens_per_call(128)
    before = small.tokens_per_call(128)
    small.observe(1000, 128, used_bytes=int(small.call_bytes(1000, 128) * 2))
    assert small.tokens_per_call(128) < before * 0.6  # a call took twice the estimate
    small.observe(1000, 128, used_bytes=1)  # less than predicted: the estimate stays
    assert small.tokens_per_call(128) < before * 0.6


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


def _batch(n: int, length: int) -> list[types.Datum]:
    rng = random.Random(0)
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints([rng.randrange(1, 2000) for _ in range(length)]),
            loss_fn_inputs={
                "target_tokens": [rng.randrange(1, 2000) for _ in range(length)],
                "weights": [1.0] * length,
            },
        )
        for _ in range(n)
    ]


def _fwd_bwd(trainer: LoraTrainer, data: list[types.Datum]) -> tuple[float, list[torch.Tensor]]:
    trainer.create_adapter("m", types.LoraConfig(rank=8, seed=1))
    out = trainer.forward_backward("m", data, "cross_entropy")
    grads = [p.grad.clone() for p in trainer._adapters["m"].params if p.grad is not None]
    return out.metrics["loss:sum"], grads


def test_a_batch_beyond_the_limit_completes_in_calls_that_fit(vllm_tiny_model, tmp_path):
    """32 x 256 tokens (~5 GB of activations in one call) under a limit of 0.6 GB above the
    loaded trainer: many calls, each within the limit, with the sums of four larger calls."""
    data = _batch(32, 256)
    reference = LoraTrainer(
        vllm_tiny_model,
        TrainerConfig(dtype="float32", max_tokens_per_batch=2048, checkpoint_dir=str(tmp_path)),
    )
    expected_loss, expected_grads = _fwd_bwd(reference, data)
    del reference
    limit = _status("VmRSS") + 0.6 * GIB
    trainer = LoraTrainer(
        vllm_tiny_model,
        TrainerConfig(dtype="float32", memory_limit_gib=limit / GIB, checkpoint_dir=str(tmp_path)),
    )
    Path("/proc/self/clear_refs").write_text("5")
    loss, grads = _fwd_bwd(trainer, data)
    peak = _status("VmHWM")
    stats = trainer.memory_stats()
    assert 256 <= stats["call_tokens"] < 2048  # one datum fits; the batch took > 4 calls
    assert peak < limit * 1.05, (peak / GIB, limit / GIB)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


@pytest.mark.slow
def test_released_adapters_give_their_memory_back(tmp_path):
    """Six rank-32 SmolLM2 adapters, each after a step (weights, AdamW moments, gradients
    used): the trainer's resident memory returns to where it was before them once released."""
    from rl.models import resolve_model

    trainer = LoraTrainer(
        resolve_model("SmolLM2-135M-Instruct"),
        TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path)),
    )
    data = _batch(4, 64)
    trainer.create_adapter("warm-up", types.LoraConfig(rank=32, seed=0))
    trainer.forward_backward("warm-up", data, "cross_entropy")
    trainer.release("warm-up")  # the first call's one-off allocations happen here
    before = _status("VmRSS")
    for i in range(6):
        trainer.create_adapter(f"m{i}", types.LoraConfig(rank=32, seed=i))
        trainer.forward_backward(f"m{i}", data, "cross_entropy")
        trainer.optim_step(f"m{i}", types.AdamParams(learning_rate=1e-3))
    grown = _status("VmRSS") - before
    assert grown > 6 * 40e6  # each adapter's weights and optimizer state: ~40+ MB
    for i in range(6):
        trainer.release(f"m{i}")
    assert trainer.adapter_ids() == []
    left = _status("VmRSS") - before
    assert left < 0.15 * grown, (left / 1e6, grown / 1e6)
