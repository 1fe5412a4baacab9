"""Bad input through the client API: a clear error naming the datum and field, and the engine
exactly as before. Each case runs on one of two twin clients (same seed, same history); after
the bad call both take the same valid step, and their results must be identical."""

from __future__ import annotations

import random

import pytest
import torch

from rl import types
from rl.errors import CheckpointError, InvalidRequestError, NotFoundError

LR = types.AdamParams(learning_rate=1e-2)


def datum(tokens, **inputs) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def good_batch(seed: int = 0) -> list[types.Datum]:
    rng = random.Random(seed)
    out = []
    for n in (6, 11):
        toks = [rng.randrange(1000) for _ in range(n + 1)]
        out.append(datum(toks[:-1], target_tokens=toks[1:], weights=[1.0] * n))
    return out


def rl_datum(n: int = 5, **overrides) -> types.Datum:
    inputs = {
        "target_tokens": list(range(10, 10 + n)),
        "logprobs": [-1.0] * n,
        "advantages": [0.5] * n,
    }
    inputs.update(overrides)
    return datum(list(range(20, 20 + n)), **inputs)


BAD_CALLS = {
    "length mismatch": (
        lambda c: c.forward_backward(
            [good_batch()[0], datum([1, 2, 3], target_tokens=[2, 3], weights=[1.0, 1.0])],
            "cross_entropy",
        ),
        r"datum 1: loss_fn_inputs\['target_tokens'\] has shape \[2\] but model_input has 3 tokens",
    ),
    "token outside vocab": (
        lambda c: c.forward_backward(
            [datum([1, 10**6], target_tokens=[2, 3], weights=[1.0, 1.0])], "cross_entropy"
        ),
        r"datum 0: model_input: token id 1000000 .* outside the vocabulary",
    ),
    "target outside vocab": (
        lambda c: c.forward_backward(
            [good_batch()[0], datum([1, 2], target_tokens=[2, -1], weights=[1.0, 1.0])],
            "cross_entropy",
        ),
        r"datum 1: loss_fn_inputs\['target_tokens'\]: token id -1",
    ),
    "missing key": (
        lambda c: c.forward_backward(
            [rl_datum(), datum([1, 2], target_tokens=[2, 3], logprobs=[0.0, 0.0])], "ppo"
        ),
        r"datum 1: loss_fn_inputs is missing \['advantages'\] required by 'ppo'",
    ),
    "unknown loss": (
        lambda c: c.forward_backward(good_batch(), "reinforce_plus_plus"),
        r"unknown loss 'reinforce_plus_plus'",
    ),
    "nan weights": (
        lambda c: c.forward_backward(
            [datum([1, 2], target_tokens=[2, 3], weights=[1.0, float("nan")])], "cross_entropy"
        ),
        r"datum 0: loss_fn_inputs\['weights'\] holds a non-finite value \(nan\)",
    ),
    "inf advantages": (
        lambda c: c.forward_backward(
            [rl_datum(), rl_datum(advantages=[0.0, float("inf"), 0.0, 0.0, 0.0])],
            "importance_sampling",
        ),
        r"datum 1: loss_fn_inputs\['advantages'\] holds a non-finite value \(inf\) at flat index 1",
    ),
    "empty batch": (
        lambda c: c.forward_backward([], "cross_entropy"),
        r"empty batch",
    ),
    "longer than context": (
        lambda c: c.forward_backward(
            [datum([5] * 1500, target_tokens=[5] * 1500, weights=[1.0] * 1500)], "cross_entropy"
        ),
        r"datum 0: model_input has 1500 tokens, more than the model's context of 1024",
    ),
    "unknown loss config": (
        lambda c: c.forward_backward([rl_datum()], "ppo", {"clip_ratio": 0.2}),
        r"loss_fn_config key 'clip_ratio' is not used by 'ppo'",
    ),
    "checkpoint name with slash": (
        lambda c: c.save_state("../escape"),
        r"checkpoint name '../escape' must not contain",
    ),
    "checkpoint name with dots": (
        lambda c: c.save_weights_for_sampler("a..b"),
        r"must not contain",
    ),
    "missing checkpoint": (
        lambda c: c.load_state("/nonexistent/checkpoint"),
        r"is not a directory",
    ),
}


@pytest.fixture(scope="module")
def twins(service, tiny_model):
    a = service.create_lora_training_client(tiny_model, rank=4, seed=123)
    b = service.create_lora_training_client(tiny_model, rank=4, seed=123)
    return a, b


def probe(client) -> list[torch.Tensor]:
    out = client.forward(good_batch(99)).result()
    return [o["logprobs"].to_torch() for o in out.loss_fn_outputs]


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_errors_and_changes_nothing(twins, case):
    bad_client, twin = twins
    call, message = BAD_CALLS[case]
    # A pending gradient on both, so a partial accumulation by the bad call would show.
    for client in twins:
        client.forward_backward(good_batch(1), "cross_entropy").result()
    with pytest.raises((InvalidRequestError, CheckpointError)) as error:
        call(bad_client).result()
    assert error.match(message)
    steps = [c.optim_step(LR).result().metrics for c in twins]
    assert steps[0] == steps[1]
    for x, y in zip(probe(bad_client), probe(twin), strict=True):
        assert torch.equal(x, y)


def test_optim_step_with_no_gradient_is_an_error(twins):
    bad_client, twin = twins
    with pytest.raises(InvalidRequestError, match="no gradient accumulated"):
        bad_client.optim_step(LR).result()
    for client in twins:
        client.forward_backward(good_batch(2), "cross_entropy").result()
        client.optim_step(LR).result()
    assert torch.equal(probe(bad_client)[0], probe(twin)[0])


def test_unknown_model_id(twins):
    client = twins[0]
    ref = client.trainer_actor.forward.remote("nobody:train:9", good_batch())
    from rl.futures import ray_get

    with pytest.raises(NotFoundError, match="unknown model id 'nobody:train:9'"):
        ray_get(ref)


def test_checkpoint_for_another_base_model(service, twins, other_tiny_model):
    other = service.create_lora_training_client(other_tiny_model, rank=4, seed=0)
    path = other.save_state("other-model").result().path
    with pytest.raises(CheckpointError, match="made for base model"):
        twins[0].load_state_with_optimizer(path).result()
    with pytest.raises(CheckpointError, match="made for base model"):
        service.create_training_client_from_state(path, base_model=twins[0].base_model)
    for client in twins:
        client.forward_backward(good_batch(3), "cross_entropy").result()
        client.optim_step(LR).result()
    assert torch.equal(probe(twins[0])[0], probe(twins[1])[0])


def test_malformed_datum_fails_at_construction():
    with pytest.raises(ValueError, match="target_tokens"):
        datum([1, 2], target_tokens=["a", "b"], weights=[1.0, 1.0])
