"""The trainer engine in-process (no Ray): batching, independence, checkpoints, seeds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rl import types
from rl.errors import CheckpointError, InvalidRequestError
from trainers import LoraTrainer, TrainerConfig
from trainers.batching import plan_buckets

LR = types.AdamParams(learning_rate=1e-2)


def make_datum(rng: random.Random, length: int, loss: str = "cross_entropy") -> types.Datum:
    tokens = [rng.randrange(2000) for _ in range(length + 1)]
    inputs: dict = {"target_tokens": tokens[1:]}
    if loss == "cross_entropy":
        inputs["weights"] = [1.0] * length
    else:
        inputs["logprobs"] = [-rng.random() * 3 for _ in range(length)]
        inputs["advantages"] = [rng.choice([-1.0, 0.5, 1.0]) for _ in range(length)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def batch(seed: int = 0, lengths=(5, 17, 30, 8), loss: str = "cross_entropy") -> list[types.Datum]:
    rng = random.Random(seed)
    return [make_datum(rng, n, loss) for n in lengths]


@pytest.fixture(scope="module")
def trainer(tiny_model, tmp_path_factory) -> LoraTrainer:
    config = TrainerConfig(
        dtype="float32",
        checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")),
        max_tokens_per_batch=64,
    )
    return LoraTrainer(tiny_model, config)


_ids = iter(range(10**6))


def new_adapter(trainer: LoraTrainer, **kwargs) -> str:
    model_id = f"t:{next(_ids)}"
    trainer.create_adapter(model_id, types.LoraConfig(rank=kwargs.pop("rank", 4), **kwargs))
    return model_id


def logprobs(trainer: LoraTrainer, model_id: str, data) -> list[torch.Tensor]:
    out = trainer.forward(model_id, data)
    return [o["logprobs"].to_torch() for o in out.loss_fn_outputs]


def train_steps(trainer, model_id, steps=2, seed=0):
    for s in range(steps):
        trainer.forward_backward(model_id, batch(seed + s), "cross_entropy")
        trainer.optim_step(model_id, LR)


def test_plan_buckets_bounds_padding_and_calls():
    lengths = [16, 500, 20, 480, 18, 30]
    buckets = plan_buckets(lengths, max_tokens=2048, call_overhead=64)
    assert sorted(i for b in buckets for i in b) == list(range(6))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    assert padded < len(lengths) * max(lengths)
    assert 1 < len(buckets) < len(lengths)
    assert all(len(b) * max(lengths[i] for i in b) <= 2048 for b in buckets if len(b) > 1)


def test_bucketed_batch_matches_one_datum_at_a_time(trainer):
    model_id = new_adapter(trainer, seed=1)
    train_steps(trainer, model_id, 1)  # non-zero LoRA B, so the adapter matters
    data = batch(3, lengths=(3, 40, 7, 25, 12, 2))
    together = logprobs(trainer, model_id, data)
    for datum, joint in zip(data, together, strict=True):
        (alone,) = logprobs(trainer, model_id, [datum])
        assert torch.allclose(alone, joint, atol=1e-5)


def test_logprobs_are_shifted_targets(trainer):
    """Position i predicts target i: the logprob equals log_softmax at i of the target."""
    model_id = new_adapter(trainer, seed=2)
    (datum,) = batch(4, lengths=(6,))
    (lp,) = logprobs(trainer, model_id, [datum])
    model = trainer._peft_model()
    ids = torch.tensor([datum.model_input.to_ints()])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    targets = datum.loss_fn_inputs["target_tokens"].to_torch()
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(lp, expected, atol=1e-5)


def test_training_lowers_the_loss(trainer):
    model_id = new_adapter(trainer, seed=0)
    data = batch(7)
    first = trainer.forward_backward(model_id, data, "cross_entropy").metrics["loss:sum"]
    trainer.optim_step(model_id, LR)
    for _ in range(5):
        trainer.forward_backward(model_id, data, "cross_entropy")
        trainer.optim_step(model_id, LR)
    last = trainer.forward(model_id, data).metrics["loss:sum"]
    assert last < first * 0.9


def test_two_adapters_stay_independent(trainer):
    a, b = new_adapter(trainer, seed=5), new_adapter(trainer, seed=5)
    probe = batch(9)
    b_before = logprobs(trainer, b, probe)
    trainer.forward_backward(b, batch(10), "cross_entropy")  # pending gradient on b
    train_steps(trainer, a, 3)
    assert not torch.allclose(logprobs(trainer, a, probe)[1], b_before[1])
    for x, y in zip(logprobs(trainer, b, probe), b_before, strict=True):
        assert torch.equal(x, y)
    # b's pending gradient survived a's steps: b's step equals a fresh b' doing the same.
    trainer.optim_step(b, LR)
    c = new_adapter(trainer, seed=5)
    trainer.forward_backward(c, batch(10), "cross_entropy")
    trainer.optim_step(c, LR)
    for x, y in zip(logprobs(trainer, b, probe), logprobs(trainer, c, probe), strict=True):
        assert torch.equal(x, y)


def test_same_seed_same_results_and_different_seed_differs(trainer):
    runs = []
    for seed in (11, 11, 12):
        model_id = new_adapter(trainer, seed=seed)
        train_steps(trainer, model_id, 2)
        runs.append(logprobs(trainer, model_id, batch(20)))
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1], strict=True))
    assert not torch.equal(runs[0][0], runs[2][0])


def test_grad_norm_reported_without_clipping_and_clipping_applies(trainer):
    a, b = new_adapter(trainer, seed=3), new_adapter(trainer, seed=3)
    for model_id in (a, b):
        trainer.forward_backward(model_id, batch(1), "cross_entropy")
    free = trainer.optim_step(a, types.AdamParams(learning_rate=1e-2)).metrics
    clipped = trainer.optim_step(
        b, types.AdamParams(learning_rate=1e-2, grad_clip_norm=1e-3)
    ).metrics
    assert free["grad_norm:mean"] > 1e-3
    assert clipped["grad_norm:mean"] == pytest.approx(free["grad_norm:mean"], rel=1e-5)


def test_gradients_accumulate_across_calls(trainer):
    """Two forward_backward calls on halves then a step == one call on the whole batch."""
    data = batch(30, lengths=(5, 9, 13, 4))
    split, whole = new_adapter(trainer, seed=8), new_adapter(trainer, seed=8)
    train_steps(trainer, split, 1)
    train_steps(trainer, whole, 1)
    trainer.forward_backward(split, data[:2], "cross_entropy")
    trainer.forward_backward(split, data[2:], "cross_entropy")
    trainer.forward_backward(whole, data, "cross_entropy")
    trainer.optim_step(split, LR)
    trainer.optim_step(whole, LR)
    for x, y in zip(logprobs(trainer, split, data), logprobs(trainer, whole, data), strict=True):
        assert torch.allclose(x, y, atol=1e-5)


def test_save_load_state_gives_identical_logprobs_and_next_step(trainer):
    model_id = new_adapter(trainer, seed=4)
    train_steps(trainer, model_id, 2)
    path = trainer.save_state(model_id, "ckpt-a").path
    restored = f"t:{next(_ids)}"
    trainer.create_adapter_from_state(restored, path, with_optimizer=True)
    probe = batch(40)
    for x, y in zip(
        logprobs(trainer, model_id, probe), logprobs(trainer, restored, probe), strict=True
    ):
        assert torch.equal(x, y)
    for m in (model_id, restored):
        trainer.forward_backward(m, batch(41), "cross_entropy")
        trainer.optim_step(m, LR)
    for x, y in zip(
        logprobs(trainer, model_id, probe), logprobs(trainer, restored, probe), strict=True
    ):
        assert torch.equal(x, y)
    assert trainer.get_info(restored).lora_config == trainer.get_info(model_id).lora_config


def test_weights_only_load_resets_the_optimizer(trainer):
    model_id = new_adapter(trainer, seed=4)
    train_steps(trainer, model_id, 2)
    path = trainer.save_state(model_id, "ckpt-b").path
    fresh = f"t:{next(_ids)}"
    trainer.create_adapter_from_state(fresh, path, with_optimizer=False)
    probe = batch(40)
    assert torch.equal(logprobs(trainer, model_id, probe)[0], logprobs(trainer, fresh, probe)[0])
    for m in (model_id, fresh):
        trainer.forward_backward(m, batch(41), "cross_entropy")
        trainer.optim_step(m, LR)
    assert not torch.equal(
        logprobs(trainer, model_id, probe)[0], logprobs(trainer, fresh, probe)[0]
    )


def test_sampler_weights_are_standard_peft(trainer, tiny_model, tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_id = new_adapter(trainer, seed=6, train_unembed=False)
    train_steps(trainer, model_id, 1)
    path = trainer.save_weights_for_sampler(model_id, "sampler-1").path
    config = json.loads(Path(path, "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, path)
    data = batch(50)
    ids = torch.tensor([data[0].model_input.to_ints()])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits[0].float()
    targets = data[0].loss_fn_inputs["target_tokens"].to_torch()
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(logprobs(trainer, model_id, data)[0], expected, atol=1e-5)


def test_merged_weights_reproduce_the_adapter(trainer, tiny_model):
    from transformers import AutoModelForCausalLM

    model_id = new_adapter(trainer, seed=6, train_unembed=False)
    train_steps(trainer, model_id, 1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.load_state_dict(trainer.merged_weights(model_id))
    data = batch(51)
    ids = torch.tensor([data[1].model_input.to_ints()])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    targets = data[1].loss_fn_inputs["target_tokens"].to_torch()
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(logprobs(trainer, model_id, data)[1], expected, atol=1e-4)


def test_checkpoint_for_another_base_model_is_rejected(trainer, other_tiny_model, tmp_path):
    other = LoraTrainer(
        other_tiny_model, TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path))
    )
    other.create_adapter("o", types.LoraConfig(rank=4, seed=0))
    path = other.save_state("o", "x").path
    model_id = new_adapter(trainer, seed=0)
    before = logprobs(trainer, model_id, batch(60))
    with pytest.raises(CheckpointError, match="made for base model"):
        trainer.load_state(model_id, path, with_optimizer=True)
    with pytest.raises(CheckpointError, match="made for base model"):
        trainer.create_adapter_from_state("never", path, with_optimizer=False)
    assert torch.equal(logprobs(trainer, model_id, batch(60))[0], before[0])
    assert "never" not in trainer._adapters


def test_optim_step_without_gradient_is_an_error(trainer):
    model_id = new_adapter(trainer, seed=0)
    with pytest.raises(InvalidRequestError, match="no gradient accumulated"):
        trainer.optim_step(model_id, LR)
    train_steps(trainer, model_id, 1)
    with pytest.raises(InvalidRequestError, match="no gradient accumulated"):
        trainer.optim_step(model_id, LR)


def test_checkpoint_of_another_lora_alpha_is_rejected(trainer, tmp_path):
    """The same weights scale by lora_alpha / rank: a checkpoint written at another alpha
    (e.g. an adapter imported from elsewhere for another trainer config) would silently give
    other outputs, so it is refused and nothing changes."""
    import json
    import shutil

    model_id = new_adapter(trainer, seed=5)
    train_steps(trainer, model_id, 1)
    path = Path(trainer.save_state(model_id, "alpha").path)
    other = tmp_path / "other-alpha"
    shutil.copytree(path, other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2
    (other / "adapter_config.json").write_text(json.dumps(config))
    before = logprobs(trainer, model_id, batch(61))
    with pytest.raises(CheckpointError, match="lora_alpha="):
        trainer.load_state(model_id, str(other), with_optimizer=True)
    with pytest.raises(CheckpointError, match="lora_alpha="):
        trainer.create_adapter_from_state("never-alpha", str(other), with_optimizer=False)
    assert torch.equal(logprobs(trainer, model_id, batch(61))[0], before[0])
    assert "never-alpha" not in trainer._adapters
