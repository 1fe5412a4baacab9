"""The sampler-side merge of a merged-mode sync (samplers/merge.py) gives the trainer's own
merged weights, and declines adapters it cannot merge exactly."""

from __future__ import annotations

import pytest
import torch

from rl import types
from samplers.merge import BaseWeights, merge_plan, merged_weights
from trainers import LoraTrainer, TrainerConfig

LR = types.AdamParams(learning_rate=1e-2)


def batch(seed: int) -> list[types.Datum]:
    tokens = torch.Generator().manual_seed(seed)
    data = []
    for length in (5, 12, 9):
        ids = torch.randint(0, 2000, (length + 1,), generator=tokens).tolist()
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * length},
            )
        )
    return data


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> tuple[LoraTrainer, str]:
    """A trainer whose adapter (attention, MLP and the tied output head) took two steps."""
    config = TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path_factory.mktemp("c")))
    trainer = LoraTrainer(tiny_model, config)
    trainer.create_adapter("m", types.LoraConfig(rank=4, seed=1))
    for step in range(2):
        trainer.forward_backward("m", batch(step), "cross_entropy")
        trainer.optim_step("m", LR)
    return trainer, tiny_model


def test_sampler_side_merge_equals_the_trainers(trained):
    trainer, model_dir = trained
    adapter_config, state = trainer.adapter_weights("m")
    merged = merged_weights(BaseWeights(model_dir), adapter_config, state, torch.float32)
    assert merged is not None
    full = trainer.merged_weights("m")
    # Every adapted module, the tied head included, and nothing else.
    adapted = {k for k, v in full.items() if k in merged}
    assert adapted == set(merged) and "lm_head.weight" in merged
    assert len(merged) == 2 * 7 + 1  # 2 layers x 7 linear modules + the head
    for name, weight in merged.items():
        torch.testing.assert_close(weight, full[name], rtol=0, atol=1e-6)
    # The head moved away from the embedding it is tied to in the checkpoint.
    assert not torch.allclose(merged["lm_head.weight"], full["model.embed_tokens.weight"])
    half = merged_weights(BaseWeights(model_dir), adapter_config, state, torch.bfloat16)
    assert half is not None and half["lm_head.weight"].dtype == torch.bfloat16


def test_adapters_it_cannot_merge_exactly_are_declined(trained, tmp_path):
    trainer, _ = trained
    adapter_config, state = trainer.adapter_weights("m")
    assert merge_plan({**adapter_config, "use_dora": True}, state) is None
    assert merge_plan(adapter_config, {**state, "base_model.model.model.norm.weight": 0}) is None
    a_key = next(k for k in state if ".lora_A." in k)
    assert merge_plan(adapter_config, {a_key: state[a_key]}) is None  # no B
    # A checkpoint without those weights (another model's directory): declined, not guessed.
    assert merged_weights(BaseWeights(str(tmp_path)), adapter_config, state, torch.float32) is None


def test_a_fresh_adapter_changes_no_weight_and_a_trained_one_does(trained, tmp_path):
    """The first merged sync of a new client is skipped on the sampler (its engine holds the
    base weights already) only while every LoRA B is zero."""
    from samplers.actor import _no_delta

    trainer, _ = trained
    _, state = trainer.adapter_weights("m")
    assert not _no_delta(state)
    fresh = LoraTrainer(trained[1], TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path)))
    fresh.create_adapter("new", types.LoraConfig(rank=4, seed=1))
    _, state = fresh.adapter_weights("new")
    assert any("lora_B" in name for name in state) and _no_delta(state)
    assert not _no_delta({})  # nothing to judge by: not skipped
