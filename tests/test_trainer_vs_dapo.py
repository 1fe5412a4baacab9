"""The loop's policy step is TRL's `loss_type="dapo"` step, computed independently.

rl.train's preset scales the advantages by 1 / (tokens sampled in the batch) and runs the ppo
loss with the sampler's logprobs as the old ones; TRL's GRPOTrainer (`loss_type="dapo"`,
`num_iterations=1`, `beta=0`) sums -exp(logp - sg(logp)) * A over every completion token and
divides by their count. On a fresh batch the two are the same objective; this checks that our
trainer (prefix packing, head chunks, clipping, AdamW settings) takes the same step as a plain
peft model with that loss and torch's AdamW, on the same LoRA init, over two steps (the
second one moves LoRA A too).
"""

from __future__ import annotations

import random

import pytest
import torch

from rl.data import scale_advantages
from rl.types import AdamParams, Datum, LoraConfig, ModelInput, to_tensor_data
from trainers import TrainerConfig
from trainers.engine import LoraTrainer

LR, BETA2, EPS, CLIP = 1e-3, 0.95, 1e-8, 1.0
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(seed: int) -> list[tuple[list[int], list[int], float]]:
    """(prompt, completion, advantage): 3 groups of 4 samples on a shared prompt each, with
    the group-mean baseline of the loop (rl.data) on random rewards."""
    rng = random.Random(seed)
    out = []
    for _ in range(3):
        prompt = [rng.randrange(5, 400) for _ in range(rng.randint(6, 12))]
        rewards = [rng.choice([-1.0, 0.0, 1.0]) for _ in range(4)]
        mean = sum(rewards) / len(rewards)
        for reward in rewards:
            completion = [rng.randrange(5, 400) for _ in range(rng.randint(2, 9))]
            out.append((prompt, completion, reward - mean))
    return out


def _datums(batch, old: list[list[float]]) -> list[Datum]:
    """As rl.data builds them: the prompt carries weight 0, the completion weight 1, its old
    logprobs and the sequence's advantage; then scaled as the preset's token mean."""
    datums = []
    for (prompt, completion, advantage), logprobs in zip(batch, old, strict=True):
        tokens = prompt + completion
        n, m = len(prompt), len(completion)
        inputs = {
            "target_tokens": tokens[1:],
            "weights": [0.0] * (n - 1) + [1.0] * m,
            "logprobs": [0.0] * (n - 1) + logprobs,
            "advantages": [0.0] * (n - 1) + [advantage] * m,
        }
        datums.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={k: to_tensor_data(v, k) for k, v in inputs.items()},
            )
        )
    return scale_advantages(datums, 1.0 / sum(len(c) for _, c, _ in batch))


def _dapo_step(model, params, optimizer, batch) -> float:
    """TRL's dapo loss over the batch, by hand; returns the pre-clip gradient norm."""
    optimizer.zero_grad()
    total = sum(len(c) for _, c, _ in batch)
    for prompt, completion, advantage in batch:
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        (-(torch.exp(logp - logp.detach()) * advantage).sum() / total).backward()
    norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
    optimizer.step()
    return float(norm)


def test_a_preset_step_is_trls_dapo_step(tiny_model, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    trainer = LoraTrainer(tiny_model, TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path)))
    trainer.create_adapter("m", LoraConfig(rank=4, seed=0, train_unembed=False))
    name = trainer._adapters["m"].name
    ours = {
        n.replace(f".{name}.", ".default."): p
        for n, p in trainer._peft_model().named_parameters()
        if f".{name}." in n
    }
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
        PeftLoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules=MODULES),
    )
    theirs = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(ours) and len(ours) == 2 * 7 * 2  # A, B x 7 x 2 layers
    with torch.no_grad():
        for key, p in theirs.items():
            p.copy_(ours[key])
    params = list(theirs.values())
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, BETA2), eps=EPS, weight_decay=0.0)
    adam = AdamParams(learning_rate=LR, beta2=BETA2, eps=EPS, grad_clip_norm=CLIP)

    for step in range(2):
        batch = _batch(step)
        # The sampler's logprobs of a fresh batch are the trainer's own (a synced sampler).
        fresh = trainer.forward("m", _datums(batch, [[0.0] * len(c) for _, c, _ in batch]), "ppo")
        old = [
            o["logprobs"].to_torch()[-len(c) :].tolist()
            for o, (_, c, _) in zip(fresh.loss_fn_outputs, batch, strict=True)
        ]
        trainer.forward_backward("m", _datums(batch, old), "ppo")
        got_norm = trainer.optim_step("m", adam).metrics["grad_norm:mean"]
        want_norm = _dapo_step(reference, params, optimizer, batch)
        assert got_norm == pytest.approx(want_norm, rel=1e-4), step
        moved = 0
        for key, p in theirs.items():
            # An Adam step moves an element by ~LR, whatever its gradient's size; elements
            # whose gradient is near EPS differ by a small part of LR.
            torch.testing.assert_close(ours[key].detach(), p.detach(), rtol=0, atol=LR * 1e-2)
            moved += int((p.detach() != 0).sum()) if "lora_B" in key else 0
        assert moved > 0  # B left zero: the step did not happen
