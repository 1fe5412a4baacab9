"""Calls of several adapters in one pass over the base model (trainers/mixed.py): each gets the
outputs and gradients it gets alone, whatever the ranks, losses and batch shapes around it."""

from __future__ import annotations

import random

import pytest
import torch

from rl import types
from rl.errors import InvalidRequestError
from rl.futures import ray_get
from trainers import LoraTrainer, TrainerConfig
from trainers.mixed import Call


def _rl_group(rng: random.Random, prompt_len: int, n: int) -> list[types.Datum]:
    """A group: n completions of one prompt (shared prefix: packed rows)."""
    prompt = [rng.randrange(1, 2000) for _ in range(prompt_len)]
    out = []
    for _ in range(n):
        tokens = prompt + [rng.randrange(1, 2000) for _ in range(rng.randint(3, 9))]
        m = len(tokens) - 1
        weights = [0.0] * (prompt_len - 1) + [1.0] * (m - prompt_len + 1)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "weights": weights,
                    "logprobs": [-rng.random() * 3 for _ in range(m)],
                    "advantages": [w * rng.choice([-1.0, 0.5, 1.0]) for w in weights],
                },
            )
        )
    return out


def _sft(rng: random.Random, lengths: tuple[int, ...]) -> list[types.Datum]:
    out = []
    for n in lengths:
        tokens = [rng.randrange(1, 2000) for _ in range(n + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * n},
            )
        )
    return out


def _calls(rng: random.Random) -> list[Call]:
    return [
        Call("a", _sft(rng, (7, 19, 3)), "cross_entropy"),
        Call("b", _rl_group(rng, 24, 4), "importance_sampling"),
        Call("c", _rl_group(rng, 30, 3), "ppo", {"clip_low_threshold": 0.8}),
        Call("d", _sft(rng, (11, 5)), "cross_entropy", backward=False),
    ]


RANKS = {"a": 4, "b": 8, "c": 16, "d": 8}


def _trainer(model: str, tmp_path, **config) -> LoraTrainer:
    trainer = LoraTrainer(
        model, TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path), **config)
    )
    for i, (model_id, rank) in enumerate(RANKS.items()):
        trainer.create_adapter(model_id, types.LoraConfig(rank=rank, seed=i))
    return trainer


def _grads(trainer: LoraTrainer, model_id: str) -> list[torch.Tensor]:
    return [p.grad.clone() for p in trainer._adapter(model_id).params if p.grad is not None]


@pytest.mark.parametrize("resident", [0, 2], ids=["all-resident", "two-resident"])
def test_a_shared_pass_gives_each_call_its_own_results(vllm_tiny_model, tmp_path, resident):
    alone = _trainer(vllm_tiny_model, tmp_path / "alone")
    together = _trainer(vllm_tiny_model, tmp_path / "together", max_resident_adapters=resident)
    for round_ in range(2):  # the second round adds to gradients left from the first
        calls = _calls(random.Random(round_))
        expected = [
            (alone.forward_backward if c.backward else alone.forward)(
                c.model_id, c.data, c.loss_fn, c.loss_fn_config
            )
            for c in calls
        ]
        got = together.forward_backward_many(calls)
        for want, out in zip(expected, got, strict=True):
            assert not isinstance(out, Exception), out
            assert out.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
            for a, b in zip(want.loss_fn_outputs, out.loss_fn_outputs, strict=True):
                torch.testing.assert_close(
                    b["logprobs"].to_torch(), a["logprobs"].to_torch(), atol=1e-5, rtol=1e-5
                )
    for model_id in RANKS:
        want, got = _grads(alone, model_id), _grads(together, model_id)
        assert len(want) == len(got)
        if model_id == "d":
            assert want == []  # forward only: no gradient
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()) + 1e-8, rtol=1e-4)


def test_a_bad_call_fails_alone(vllm_tiny_model, tmp_path):
    trainer = _trainer(vllm_tiny_model, tmp_path)
    rng = random.Random(5)
    bad = _sft(rng, (4,))
    bad[0].loss_fn_inputs["target_tokens"] = types.TensorData(data=[10**7] * 4, dtype="int64")
    nan = _rl_group(rng, 10, 2)
    nan[0].loss_fn_inputs["advantages"] = types.TensorData(
        data=[float("nan")] * nan[0].model_input.length, dtype="float32"
    )
    calls = [
        Call("a", bad, "cross_entropy"),
        Call("b", nan, "importance_sampling"),
        Call("c", _rl_group(rng, 12, 3), "ppo"),
    ]
    a_out, b_out, c_out = trainer.forward_backward_many(calls)
    assert isinstance(a_out, InvalidRequestError) and "vocabulary" in str(a_out)
    assert isinstance(b_out, InvalidRequestError)
    assert not isinstance(c_out, Exception) and _grads(trainer, "c")
    assert _grads(trainer, "a") == [] and _grads(trainer, "b") == []  # nothing changed
    with pytest.raises(InvalidRequestError, match="optim_step"):
        trainer.optim_step("b", types.AdamParams())  # no gradient was accumulated


def test_clients_waiting_together_share_a_pass(service, tiny_model):
    """Through the client API: calls of three clients that wait while the trainer is busy go
    as one pass, and each client's results are those it gets alone."""
    import concurrent.futures

    rng = random.Random(7)
    clients = [
        service.create_lora_training_client(tiny_model, rank=r, seed=i)
        for i, r in enumerate((4, 8, 16))
    ]
    data = [_sft(rng, (9, 4)), _rl_group(rng, 16, 3), _sft(rng, (12,))]
    losses = ["cross_entropy", "importance_sampling", "cross_entropy"]
    alone = [c.forward(d, loss).result() for c, d, loss in zip(clients, data, losses, strict=True)]
    host = service.hosts[tiny_model]
    before = ray_get(host.handle.memory_stats.remote())["shared_passes"]
    busy = clients[0].forward(_sft(rng, (200,) * 4), "cross_entropy")  # holds the trainer
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(lambda c=c, d=d, loss=loss: c.forward(d, loss).result())
            for c, d, loss in zip(clients[1:], data[1:], losses[1:], strict=True)
        ]
        together = [f.result() for f in futures]
    busy.result()
    assert ray_get(host.handle.memory_stats.remote())["shared_passes"] > before
    for want, got in zip(alone[1:], together, strict=True):
        for a, b in zip(want.loss_fn_outputs, got.loss_fn_outputs, strict=True):
            torch.testing.assert_close(
                b["logprobs"].to_torch(), a["logprobs"].to_torch(), atol=1e-5, rtol=1e-5
            )


def test_a_small_call_waits_for_about_one_call_of_another_tenant(service, tiny_model):
    """Fair turns: a tenant with one small call, behind another's queue of large ones, waits
    for the pass under way and rides the next one, not for the whole queue."""
    import time

    rng = random.Random(11)
    busy, small = (service.create_lora_training_client(tiny_model, rank=8, seed=s) for s in (1, 2))
    large = _sft(rng, (300,) * 6)
    began = time.perf_counter()
    busy.forward(large, "cross_entropy").result()
    one_large = time.perf_counter() - began
    queue = [busy.forward(large, "cross_entropy") for _ in range(5)]
    time.sleep(one_large * 0.2)  # the first of them is on the trainer
    began = time.perf_counter()
    small.forward(_sft(rng, (8,)), "cross_entropy").result()
    waited = time.perf_counter() - began
    for future in queue:
        future.result()
    assert waited < 2.5 * one_large + 0.5, (waited, one_large)  # the whole queue is ~5x
