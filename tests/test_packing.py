"""Prefix-tree rows (trainers/packing.py): datums that share a prefix compute it once, and
every logprob, loss and gradient is what one row per datum gives."""

from __future__ import annotations

import random

import pytest
import torch

from rl import types
from trainers import LoraTrainer, TrainerConfig
from trainers.packing import pack_bucket, plan_rows


def test_rows_share_prefixes_and_keep_the_rest_apart():
    prompt_a, prompt_b = list(range(100, 120)), list(range(200, 220))
    sequences = [
        [*prompt_a, 1, 2, 3],
        list(range(500, 530)),  # shares nothing: a row of its own
        [*prompt_b, 4],
        [*prompt_a, 1, 2, 9, 9],
        prompt_a,  # a prefix of the others
        [*prompt_b, 5, 6],
    ]
    rows = plan_rows(sequences, min_shared=16, max_row_tokens=256)
    grouped = sorted(sorted(row.members) for row in rows)
    assert grouped == [[0, 3, 4], [1], [2, 5]]
    (row,) = [r for r in rows if sorted(r.members) == [0, 3, 4]]
    assert row.size == 20 + 3 + 2  # the prompt once, "1 2" once, then "3" and "9 9"
    for member, path in zip(row.members, row.paths, strict=True):
        assert [row.tokens[n] for n in path] == sequences[member]
        assert [row.depth[n] for n in path] == list(range(len(sequences[member])))
    allowed = row.attention(row.size + 2)
    for path in row.paths:
        for q_at, q in enumerate(path):  # a node sees exactly its own sequence's earlier tokens
            assert set(torch.nonzero(allowed[q]).flatten().tolist()) == set(path[: q_at + 1])
    assert allowed[row.size + 1].tolist() == [False] * (row.size + 1) + [True]  # padding


def test_rows_respect_the_size_cap_and_the_shared_minimum():
    prompt = list(range(100, 140))
    sequences = [prompt + [i] * 10 for i in range(8)]
    rows = plan_rows(sequences, min_shared=16, max_row_tokens=80)
    rows = plan_rows(sequences, min_shared=16, max_row_tokens=79)
    assert [r.size for r in rows] == [40 + 30, 40 + 30, 40 + 20]  # each row repeats the prompt
    assert sorted(i for r in rows for i in r.members) == list(range(8))
    assert len(plan_rows(sequences, min_shared=41, max_row_tokens=1000)) == 8


def test_the_output_head_runs_once_per_shared_position():
    prompt = list(range(100, 120))
    sequences = [[*prompt, 1, 2], [*prompt, 3]]
    (row,) = plan_rows(sequences, min_shared=16, max_row_tokens=256)
    targets = {i: torch.tensor([*s[1:], 0]).reshape(-1, 1) for i, s in enumerate(sequences)}
    packed = pack_bucket([row], targets, torch.float32)
    # 19 prompt positions predict prompt tokens (shared); position 19 predicts 1 or 3 (two
    # entries), then "1" predicts 2 and "2" predicts 0, "3" predicts 0: 19 + 2 + 2 + 1.
    assert packed.head_targets.shape == (24, 1)
    for i, pick in zip(packed.datums, packed.picks, strict=True):
        assert packed.head_targets[pick].flatten().tolist() == targets[i].flatten().tolist()


def _group_batch(rng: random.Random, loss: str) -> list[types.Datum]:
    """Three prompts x four completions of different lengths, a datum that is a prefix of
    others, and one unrelated datum: an RL batch's shape, in small."""
    system = [rng.randrange(2000) for _ in range(18)]
    sequences = []
    for _ in range(3):
        prompt = system + [rng.randrange(2000) for _ in range(rng.randrange(3, 9))]
        sequences += [prompt + [rng.randrange(2000) for _ in range(n)] for n in (1, 4, 7, 7)]
    sequences.append(sequences[2][:-2])
    sequences.append([rng.randrange(2000) for _ in range(25)])
    data = []
    for tokens in sequences:
        n = len(tokens) - 1
        inputs: dict = {"target_tokens": tokens[1:]}
        if loss == "cross_entropy":
            inputs["weights"] = [rng.random() for _ in range(n)]
        else:
            inputs["logprobs"] = [-rng.random() * 3 for _ in range(n)]
            inputs["advantages"] = [rng.choice([-1.0, 0.5, 1.0]) for _ in range(n)]
        data.append(
            types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
        )
    return data


@pytest.mark.parametrize("loss", ["cross_entropy", "ppo"])
def test_prefix_rows_give_the_padded_rows_numbers(tiny_model, tmp_path, loss):
    data = _group_batch(random.Random(3), loss)
    results = []
    for row_tokens in (0, 256):
        config = TrainerConfig(
            dtype="float32",
            checkpoint_dir=str(tmp_path / str(row_tokens)),
            shared_prefix_row_tokens=row_tokens,
            max_tokens_per_batch=160,  # several buckets
        )
        trainer = LoraTrainer(tiny_model, config)
        trainer.create_adapter("m", types.LoraConfig(rank=4, seed=1))
        steps = []
        for _ in range(2):
            out = trainer.forward_backward("m", data, loss)
            grads = [p.grad.clone() for p in trainer._adapter("m").params if p.grad is not None]
            trainer.optim_step("m", types.AdamParams(learning_rate=1e-2))
            logprobs = [o["logprobs"].to_torch() for o in out.loss_fn_outputs]
            steps.append((logprobs, out.metrics, grads))
        results.append(steps)
    (plain, packed) = results
    for (lp_a, metrics_a, grads_a), (lp_b, metrics_b, grads_b) in zip(plain, packed, strict=True):
        for a, b in zip(lp_a, lp_b, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        key = "loss:sum"
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-5, abs=1e-5)
        assert len(grads_a) == len(grads_b) > 0
        for a, b in zip(grads_a, grads_b, strict=True):
            # Each element sums over every token of the batch, in another order when packed:
            # float32 noise of up to ~2e-4 of the largest element (seen on AMD EPYC hosts).
            torch.testing.assert_close(a, b, atol=3e-4 * float(a.abs().max()), rtol=1e-4)


def test_top_k_targets(tiny_model, tmp_path):
    """Datums with [N, K] targets in one prefix row."""
    rng = random.Random(5)
    prompt = [rng.randrange(2000) for _ in range(20)]
    data = []
    for k, extra in ((3, [7, 8]), (3, [9])):
        tokens = prompt + extra
        n = len(tokens) - 1
        targets = [[tokens[t + 1]] + [rng.randrange(2000) for _ in range(k - 1)] for t in range(n)]
        weights = [[1.0] * k for _ in range(n)]
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_torch(torch.tensor(targets)),
                    "weights": types.TensorData.from_torch(torch.tensor(weights)),
                },
            )
        )
    outs = []
    for row_tokens in (0, 256):
        config = TrainerConfig(
            dtype="float32", checkpoint_dir=str(tmp_path), shared_prefix_row_tokens=row_tokens
        )
        trainer = LoraTrainer(tiny_model, config)
        trainer.create_adapter("m", types.LoraConfig(rank=4, seed=1))
        outs.append([o["logprobs"].to_torch() for o in trainer.forward("m", data).loss_fn_outputs])
    for a, b in zip(*outs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
