"""`gspo` and `stable_reinforce` against values and gradients worked by hand, their inputs'
checks, and both through the client API (in-process) against the same formulas in plain Python."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rl import types
from rl.errors import InvalidRequestError
from trainers.losses import LOSSES, per_datum_loss, resolve_config
from trainers.validation import prepare_batch

E = math.exp
WIDE = {"clip_low_threshold": 0.0, "clip_high_threshold": 100.0}


def run(name, p, config=None, **inputs):
    """One loss call on a leaf `p`: (loss, d loss / d p, metrics)."""
    p = torch.tensor(p, requires_grad=True)
    tensors = {k: torch.tensor(v) for k, v in inputs.items()}
    loss, metrics = LOSSES[name].fn(p, tensors, resolve_config(name, config))
    loss.backward()
    return loss.item(), p.grad.tolist(), metrics


# -- gspo -----------------------------------------------------------------------------------


def test_gspo_sequence_ratio_inside_the_band():
    # M = tokens 1, 2: log s = ((-0.5 + 0.4) + (-2.0 + 2.0)) / 2 = -0.05; token 0's p - q = 0.2
    # stays out of it. s in [0.8, 1.2]: L = -(s * 1 + s * -0.5); d/dp_t = -A_t * s.
    s = E(-0.05)
    loss, grad, metrics = run(
        "gspo",
        [-1.0, -0.5, -2.0],
        {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        logprobs=[-1.2, -0.4, -2.0],
        advantages=[0.0, 1.0, -0.5],
        sequence_ratio_mask=[0.0, 1.0, 1.0],
    )
    assert loss == pytest.approx(-0.5 * s)
    assert grad == pytest.approx([0.0, -s, 0.5 * s])
    assert metrics["ratio:mean"] == pytest.approx(s)
    assert metrics["clip_fraction:mean"] == 0.0


def test_gspo_clips_the_sequence_ratio_per_token_sign():
    # log s = (0.4 + 0.5) / 2 = 0.45, s = 1.568 > 1.2. A > 0: min(s, 1.2) * A = 1.2, no gradient;
    # A < 0: min(-0.5 s, -0.6) = -0.5 s, unclipped, gradient 0.5 s. Token 0 (p - q = 2) is
    # outside the mask and has A = 0.
    s = E(0.45)
    loss, grad, metrics = run(
        "gspo",
        [-1.0, -0.1, -1.5],
        {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        logprobs=[-3.0, -0.5, -2.0],
        advantages=[0.0, 1.0, -0.5],
        sequence_ratio_mask=[0.0, 1.0, 1.0],
    )
    assert loss == pytest.approx(-(1.2 * 1.0 + s * -0.5))
    assert grad == pytest.approx([0.0, 0.0, 0.5 * s])
    assert metrics["clip_fraction:mean"] == 1.0


def test_gspo_defaults_are_the_paper_epsilons():
    assert resolve_config("gspo", None) == {
        "clip_low_threshold": pytest.approx(1 - 3e-4),
        "clip_high_threshold": pytest.approx(1 + 4e-4),
    }
    # log s = 1e-3 > log(1.0004): a positive advantage is clipped at the defaults.
    _, grad, _ = run("gspo", [-1.0], logprobs=[-1.001], advantages=[1.0], sequence_ratio_mask=[1.0])
    assert grad == [0.0]


def test_gspo_weights_and_default_mask():
    # No sequence_ratio_mask: M = tokens with nonzero weight (token 1 only): log s = 0.1.
    # The weight also scales each token's term: token 0 (weight 0) has no gradient.
    s = E(0.1)
    loss, grad, _ = run(
        "gspo",
        [-1.0, -1.0],
        WIDE,
        logprobs=[-3.0, -1.1],
        advantages=[2.0, 1.0],
        weights=[0.0, 0.5],
    )
    assert loss == pytest.approx(-0.5 * s)
    assert grad == pytest.approx([0.0, -0.5 * s])
    # Neither mask nor weights: M = tokens with nonzero advantage.
    loss, _, _ = run("gspo", [-1.0, -1.0], WIDE, logprobs=[-3.0, -1.1], advantages=[0.0, 1.0])
    assert loss == pytest.approx(-s)


def test_gspo_ratio_is_a_mean_per_datum():
    # Datum a: p - q = [0.2, 0.2] -> s_a = e^0.2; datum b: [0, -0.3, 0] -> s_b = e^-0.1.
    # Concatenated, one mean would give e^0.02 to both.
    s_a, s_b = E(0.2), E(-0.1)
    p_a = torch.tensor([-1.0, -2.0], requires_grad=True)
    p_b = torch.tensor([-0.5, -0.5, -1.0], requires_grad=True)
    inputs = [
        {"logprobs": torch.tensor([-1.2, -2.2]), "advantages": torch.tensor([1.0, 1.0])},
        {"logprobs": torch.tensor([-0.5, -0.2, -1.0]), "advantages": torch.tensor([-1.0] * 3)},
    ]
    for d in inputs:
        d["sequence_ratio_mask"] = torch.ones_like(d["advantages"])
    loss, metrics = per_datum_loss(LOSSES["gspo"].fn, [p_a, p_b], inputs, WIDE)
    loss.backward()
    assert loss.item() == pytest.approx(-(2 * s_a - 3 * s_b))
    assert p_a.grad.tolist() == pytest.approx([-s_a, -s_a])
    assert p_b.grad.tolist() == pytest.approx([s_b, s_b, s_b])
    assert metrics["ratio:mean"] == pytest.approx((s_a + s_b) / 2)
    assert metrics["loss:sum"] == pytest.approx(loss.item())


def test_gspo_datum_with_empty_mask_contributes_nothing():
    p = torch.tensor([-1.0, -2.0], requires_grad=True)
    empty = {
        "logprobs": torch.tensor([-5.0, 0.0]),
        "advantages": torch.tensor([1.0, 1.0]),
        "sequence_ratio_mask": torch.zeros(2),
    }
    other = {**empty, "sequence_ratio_mask": torch.ones(2), "logprobs": torch.tensor([-1.0, -2.0])}
    loss, metrics = per_datum_loss(LOSSES["gspo"].fn, [p, p], [empty, other], WIDE)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(-2.0)
    assert p.grad.tolist() == pytest.approx([-1.0, -1.0])  # the other datum's only
    assert metrics["ratio:mean"] == pytest.approx(1.0)  # the empty datum reports no ratio


# -- stable_reinforce -------------------------------------------------------------------------


def test_stable_reinforce_by_hand():
    # Defaults: band [0.5, 2], kl_coeff 0.1. Token 3 has A = 0 and no weights: not counted
    # (its q = 0 is a prompt placeholder), so neither term reaches it.
    # delta = [0.2, 0, -1.5]; r = [e^0.2, 1, e^-1.5 = 0.22 (out of the band)].
    r = [E(0.2), 1.0, E(-1.5)]
    k3 = [r[0] - 1 - 0.2, 0.0, r[2] - 1 + 1.5]
    policy = -(r[0] * 1.0 * -1.0 + 1.0 * -1.0 * -0.5)  # -sum w A p over the band
    loss, grad, metrics = run(
        "stable_reinforce",
        [-1.0, -0.5, -2.0, -0.3],
        logprobs=[-1.2, -0.5, -0.5, 0.0],
        advantages=[1.0, -1.0, 1.0, 0.0],
    )
    assert loss == pytest.approx(policy + 0.1 * sum(k3))
    # d/dp = -w A + kl_coeff (r - 1): token 2 has only the pull back (r < 1: upwards).
    assert grad == pytest.approx([-r[0] + 0.1 * (r[0] - 1), 1.0, 0.1 * (r[2] - 1), 0.0])
    assert metrics["ratio:mean"] == pytest.approx(sum(r) / 3)
    assert metrics["masked_fraction:mean"] == pytest.approx(1 / 3)
    assert metrics["kl:mean"] == pytest.approx(sum(k3) / 3)


def test_stable_reinforce_masks_above_the_band_and_honours_weights():
    # r = e^1 = 2.72 > 2: no policy gradient, only kl_coeff * (r - 1) * weight.
    config = {"kl_coeff": 0.5, "mask_low_threshold": 0.9, "mask_high_threshold": 2.0}
    loss, grad, _ = run(
        "stable_reinforce",
        [0.0, -1.0, -1.0],
        config,
        logprobs=[-1.0, -1.0, -4.0],
        advantages=[1.0, 2.0, 3.0],
        weights=[0.5, 1.0, 0.0],
    )
    e = math.e
    assert loss == pytest.approx(0.5 * 0.5 * (e - 2) - 1.0 * 2.0 * -1.0)
    assert grad == pytest.approx([0.5 * 0.5 * (e - 1), -2.0, 0.0])


def test_stable_reinforce_inside_the_band_is_importance_sampling():
    p, q, a = [-1.0, -0.7, -2.0], [-1.1, -0.6, -2.3], [0.5, -1.0, 2.0]
    _, expected, _ = run("importance_sampling", p, logprobs=q, advantages=a)
    _, grad, metrics = run("stable_reinforce", p, {"kl_coeff": 0.0}, logprobs=q, advantages=a)
    assert grad == pytest.approx(expected)
    assert metrics["masked_fraction:mean"] == 0.0


def test_stable_reinforce_config():
    assert resolve_config("stable_reinforce", None) == {
        "kl_coeff": 0.1,
        "mask_low_threshold": 0.5,
        "mask_high_threshold": 2.0,
    }
    assert resolve_config("stable_reinforce", {"kl_coeff": 0})["kl_coeff"] == 0.0
    with pytest.raises(InvalidRequestError, match="kl_coeff"):
        resolve_config("stable_reinforce", {"clip_high_threshold": 1.5})
    with pytest.raises(InvalidRequestError, match="clip_low_threshold"):
        resolve_config("gspo", {"kl_coeff": 0.1})


# -- validation -------------------------------------------------------------------------------


def datum(n: int, seed: int = 0, **extra) -> types.Datum:
    rng = random.Random(seed)
    tokens = [rng.randrange(1, 3000) for _ in range(n + 1)]
    inputs = {
        "target_tokens": tokens[1:],
        "logprobs": [-rng.random() for _ in range(n)],
        "advantages": [rng.choice([-1.0, 1.0]) for _ in range(n)],
        **extra,
    }
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def prepare(data, loss_fn):
    return prepare_batch(data, loss_fn, None, vocab_size=4000, max_context=64)


def test_sequence_ratio_mask_is_checked():
    batch = prepare([datum(3, sequence_ratio_mask=[0.0, 1.0, 1.0])], "gspo")
    assert batch.datums[0].inputs["sequence_ratio_mask"].dtype == torch.float32
    with pytest.raises(InvalidRequestError, match=r"datum 1: .*sequence_ratio_mask.*3 tokens"):
        prepare([datum(2), datum(3, sequence_ratio_mask=[1.0, 1.0])], "gspo")
    with pytest.raises(InvalidRequestError, match=r"datum 0: .*sequence_ratio_mask.*non-finite"):
        prepare([datum(2, sequence_ratio_mask=[1.0, float("nan")])], "gspo")
    with pytest.raises(InvalidRequestError, match="not used by 'stable_reinforce'"):
        prepare([datum(2, sequence_ratio_mask=[1.0, 1.0])], "stable_reinforce")


# -- through the client API -------------------------------------------------------------------


def gspo_by_hand(p, q, a, m, lo, hi) -> float:
    inside = [pt - qt for pt, qt, mt in zip(p, q, m, strict=True) if mt != 0]
    if not inside:
        return 0.0
    s = math.exp(sum(inside) / len(inside))
    clipped = min(max(s, lo), hi)
    return -sum(min(s * at, clipped * at) for at in a)


def stable_reinforce_by_hand(p, q, a, kl_coeff=0.1, lo=0.5, hi=2.0) -> float:
    total = 0.0
    for pt, qt, at in zip(p, q, a, strict=True):
        if at == 0:
            continue
        r = math.exp(pt - qt)
        total += -(r * at * pt if lo <= r <= hi else 0.0) + kl_coeff * (r - 1 - (pt - qt))
    return total


def test_both_losses_through_the_client(service, tiny_model):
    """forward_backward on 2 datums of different lengths returns the loss of the formulas
    applied to the logprobs it returns; a bad call accumulates nothing."""
    client = service.create_lora_training_client(tiny_model, rank=4, seed=11)
    rng = random.Random(5)
    shapes = [(3, 5), (6, 4)]  # (prompt positions, sampled tokens) per datum
    plain = [datum(n + s, seed=i) for i, (n, s) in enumerate(shapes)]
    probe = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": [1.0] * (n + s),
            },
        )
        for d, (n, s) in zip(plain, shapes, strict=True)
    ]
    current = [o["logprobs"].tolist() for o in client.forward(probe).result().loss_fn_outputs]
    data, qs, advs, masks = [], [], [], []
    for d, p0, (n, s) in zip(plain, current, shapes, strict=True):
        # sampler logprobs near the trainer's, 0 on prompt positions, as the cookbook sends
        q = [0.0] * n + [lp + rng.uniform(-0.3, 0.3) for lp in p0[n:]]
        adv = [0.0] * n + [rng.choice([-1.0, 0.5, 1.0])] * s
        mask = [0.0] * n + [1.0] * s
        qs.append(q), advs.append(adv), masks.append(mask)
        inputs = {
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "logprobs": q,
            "advantages": adv,
        }
        data.append((d.model_input, inputs))

    def build(with_mask: bool):
        return [
            types.Datum(
                model_input=mi,
                loss_fn_inputs={**inputs, **({"sequence_ratio_mask": m} if with_mask else {})},
            )
            for (mi, inputs), m in zip(data, masks, strict=True)
        ]

    with pytest.raises(InvalidRequestError, match="sequence_ratio_mask"):
        bad = build(True)
        bad[1] = types.Datum(
            model_input=bad[1].model_input,
            loss_fn_inputs={**data[1][1], "sequence_ratio_mask": masks[1][:-1]},
        )
        client.forward_backward(bad, "gspo").result()
    with pytest.raises(InvalidRequestError, match="gradient"):  # nothing was accumulated
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    out = client.forward_backward(build(True), "gspo", WIDE).result()
    ps = [o["logprobs"].tolist() for o in out.loss_fn_outputs]
    expected = sum(
        gspo_by_hand(p, q, a, m, 0.0, 100.0) for p, q, a, m in zip(ps, qs, advs, masks, strict=True)
    )
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    ratios = [
        math.exp(sum(p[n:][i] - q[n:][i] for i in range(s)) / s)
        for p, q, (n, s) in zip(ps, qs, shapes, strict=True)
    ]
    assert out.metrics["ratio:mean"] == pytest.approx(sum(ratios) / 2, rel=1e-5)

    out = client.forward_backward(build(False), "stable_reinforce").result()
    ps = [o["logprobs"].tolist() for o in out.loss_fn_outputs]
    expected = sum(stable_reinforce_by_hand(p, q, a) for p, q, a in zip(ps, qs, advs, strict=True))
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert client.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics
