"""The loop's policy step is TRL's `loss_type="dapo"` step, computed independently.

rl.loop.train's preset scales the advantages by 1 / (tokens sampled in the batch) and runs the ppo
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

from envs.base import Trajectory, TrajectoryGroup, Transition
from rl.loop.datums import groups_to_datums, scale_advantages
from rl.types import AdamParams, Datum, LoraConfig
from trainers import TrainerConfig
from trainers.trainer import LoraTrainer

LR, BETA2, EPS, CLIP = 1e-3, 0.95, 1e-8, 1.0
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


Group = list[tuple[list[int], list[int], float]]  # (prompt, completion, reward) per sample


def _batch(seed: int) -> list[Group]:
    """3 groups of 4 samples with random rewards, each group on a prompt of its own."""
    rng = random.Random(seed)
    groups = []
    for _ in range(3):
        prompt = [rng.randrange(5, 400) for _ in range(rng.randint(6, 12))]
        groups.append(
            [
                (
                    prompt,
                    [rng.randrange(5, 400) for _ in range(rng.randint(2, 9))],
                    rng.choice([-1.0, 0.0, 1.0]),
                )
                for _ in range(4)
            ]
        )
    return groups


def _tokens(groups: list[Group]) -> int:
    return sum(len(c) for group in groups for _, c, _ in group)


def _datums(groups: list[Group], old: list[list[float]] | None = None) -> list[Datum]:
    """The loop's datums: rl.loop.datums's advantages (reward - group mean) and datums, scaled to the
    preset's token mean; `old`: the sampler's logprobs of each completion, in order."""
    logprobs = iter(old or [[0.0] * len(c) for group in groups for _, c, _ in group])
    trajectory_groups = [
        TrajectoryGroup(
            [Trajectory([Transition(p, c, next(logprobs), r, True)]) for p, c, r in group],
            [0.0] * len(group),
            [{} for _ in group],
        )
        for group in groups
    ]
    return scale_advantages(groups_to_datums(trajectory_groups), 1.0 / _tokens(groups))


def _dapo_step(model, params, optimizer, groups: list[Group]) -> float:
    """TRL's dapo loss over the batch, by hand; returns the pre-clip gradient norm."""
    optimizer.zero_grad()
    total = _tokens(groups)
    for group in groups:
        mean = sum(r for _, _, r in group) / len(group)
        for prompt, completion, reward in group:
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            targets = torch.tensor(completion)[:, None]
            logp = torch.log_softmax(logits, -1).gather(-1, targets)[:, 0]
            (-(torch.exp(logp - logp.detach()) * (reward - mean)).sum() / total).backward()
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
        completions = [c for group in batch for _, c, _ in group]
        # The sampler's logprobs of a fresh batch are the trainer's own (a synced sampler).
        fresh = trainer.forward("m", _datums(batch), "ppo")
        old = [
            o["logprobs"].to_torch()[-len(c) :].tolist()
            for o, c in zip(fresh.loss_fn_outputs, completions, strict=True)
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
