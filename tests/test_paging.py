"""Adapters paged out of the model and back (trainers/paging.py): a trainer that keeps one
adapter resident computes what a trainer that keeps them all does, call for call."""

from __future__ import annotations

import random

import pytest
import torch

from rl import types
from trainers import LoraTrainer, TrainerConfig


def _data(seed: int) -> list[types.Datum]:
    rng = random.Random(seed)
    out = []
    for length in (7, 12, 5):
        tokens = [rng.randrange(1, 2000) for _ in range(length + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return out


ADAM = types.AdamParams(learning_rate=1e-2)


def _session(trainer: LoraTrainer) -> list[object]:
    """Three clients taking turns, with a gradient left pending across another's calls."""
    results: list[object] = []
    for i in range(3):
        trainer.create_adapter(f"m{i}", types.LoraConfig(rank=4, seed=i))
    for round_ in range(2):
        for i in range(3):
            out = trainer.forward_backward(f"m{i}", _data(10 * round_ + i), "cross_entropy")
            results.append(out.metrics["loss:sum"])
            results.append([lp["logprobs"].tolist() for lp in out.loss_fn_outputs])
        for i in range(3):  # every step comes after the others' forward_backward
            results.append(trainer.optim_step(f"m{i}", ADAM).metrics["grad_norm:mean"])
    for i in range(3):
        results.append(trainer.forward(f"m{i}", _data(99), "cross_entropy").metrics["loss:sum"])
        adapter = trainer._adapter(f"m{i}")
        results.append([p.detach().clone() for p in adapter.params])
        state = adapter.adam.state_dict()["state"]
        results.append([state[k]["exp_avg_sq"].clone() for k in sorted(state)])
        results.append(adapter.step)
    return results


@pytest.mark.parametrize("host", [0, 1], ids=["to-disk", "host-then-disk"])
def test_paged_adapters_compute_what_resident_ones_do(tiny_model, tmp_path, host):
    def trainer(**paging) -> LoraTrainer:
        config = TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path), **paging)
        return LoraTrainer(tiny_model, config)

    resident = _session(trainer())
    paged_trainer = trainer(max_resident_adapters=1, max_host_adapters=host)
    paged = _session(paged_trainer)
    assert len(paged_trainer.resident_adapter_ids()) == 1
    assert len(paged_trainer.adapter_ids()) == 3
    for a, b in zip(resident, paged, strict=True):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x, y, atol=0, rtol=0)
        else:
            assert a == b
    # Released, a paged adapter leaves nothing behind, on disk either.
    for i in range(3):
        paged_trainer.release(f"m{i}")
    assert not list(tmp_path.glob(".paged-*/*.pt"))


def test_a_new_adapter_after_every_other_was_released(tiny_model, tmp_path):
    """peft keeps naming a deleted adapter active once none is left; a new one must work."""
    trainer = LoraTrainer(tiny_model, TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path)))
    trainer.create_adapter("a", types.LoraConfig(rank=4, seed=0))
    trainer.forward_backward("a", _data(1), "cross_entropy")
    trainer.release("a")
    trainer.create_adapter("b", types.LoraConfig(rank=4, seed=1))
    assert trainer.forward_backward("b", _data(2), "cross_entropy").metrics["loss:sum"] > 0
    assert trainer.merged_weights("b") and trainer.adapter_weights("b")
