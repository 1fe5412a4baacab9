"""The client API over Ray: the Tinker user example verbatim, futures, ordering, custom losses."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

import rl
from rl import types

LR = types.AdamParams(learning_rate=1e-2)


def batch(seed: int, lengths=(4, 9, 6)) -> list[types.Datum]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        toks = [rng.randrange(3000) for _ in range(n + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(toks[:-1]),
                loss_fn_inputs={
                    "target_tokens": toks[1:],
                    "weights": [rng.choice([0.0, 1.0, 0.5]) for _ in range(n)],
                    "logprobs": [-rng.random() * 2 for _ in range(n)],
                    "advantages": [rng.choice([-1.0, 1.0, 2.0]) for _ in range(n)],
                },
            )
        )
    return out


def only(data, *keys) -> list[types.Datum]:
    return [
        types.Datum(
            model_input=d.model_input, loss_fn_inputs={k: d.loss_fn_inputs[k] for k in keys}
        )
        for d in data
    ]


def test_tinker_user_example_runs_verbatim(service, tiny_model):
    tinker = rl  # the user writes `import rl as tinker`
    BASE = tiny_model
    input_tokens = [1, 2, 3, 4, 5, 6]
    target_tokens = [2, 3, 4, 5, 6, 7]
    weights = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]

    async def user_code():
        service_client = tinker.ServiceClient()
        training_client = service_client.create_lora_training_client(base_model=BASE, rank=32)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens=input_tokens),
            loss_fn_inputs={"weights": weights, "target_tokens": target_tokens},
        )
        fwdbwd_future = await training_client.forward_backward_async(
            data=[datum], loss_fn="cross_entropy"
        )
        fwdbwd_result = await fwdbwd_future.result_async()
        optim_future = await training_client.optim_step_async(types.AdamParams(learning_rate=1e-4))
        optim_result = await optim_future
        service_client.close()  # frees its trainer's CPU in the session's 2-CPU Ray
        return fwdbwd_result, optim_result

    fwdbwd_result, optim_result = asyncio.run(user_code())
    assert len(fwdbwd_result.loss_fn_outputs) == 1
    logprobs = fwdbwd_result.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert logprobs.shape == (6,) and (logprobs < 0).all()
    assert fwdbwd_result.metrics["loss:sum"] == pytest.approx(-float(logprobs[2:].sum()), rel=1e-5)
    assert optim_result.metrics["step:max"] == 1.0 and optim_result.metrics["grad_norm:mean"] > 0


def test_calls_run_in_submission_order(service, tiny_model):
    """Submitted back to back without waiting, the three steps equal three waited steps."""
    pipelined = service.create_lora_training_client(tiny_model, rank=4, seed=1)
    waited = service.create_lora_training_client(tiny_model, rank=4, seed=1)
    futures = []
    for step in range(3):
        futures.append(
            pipelined.forward_backward(
                only(batch(step), "target_tokens", "weights"), "cross_entropy"
            )
        )
        futures.append(pipelined.optim_step(LR))
    probe_future = pipelined.forward(only(batch(50), "target_tokens", "weights"))
    for step in range(3):
        waited.forward_backward(
            only(batch(step), "target_tokens", "weights"), "cross_entropy"
        ).result()
        waited.optim_step(LR).result()
    assert [f.result().metrics["step:max"] for f in futures[1::2]] == [1.0, 2.0, 3.0]
    expected = waited.forward(only(batch(50), "target_tokens", "weights")).result()
    got = probe_future.result()
    for a, b in zip(got.loss_fn_outputs, expected.loss_fn_outputs, strict=True):
        assert torch.equal(a["logprobs"].to_torch(), b["logprobs"].to_torch())


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo"])
def test_custom_loss_matches_builtin_gradients(service, tiny_model, loss_fn):
    """A client-side re-implementation of a built-in loss gives the same update and loss."""
    from trainers.losses import LOSSES, resolve_config

    builtin = service.create_lora_training_client(tiny_model, rank=4, seed=7)
    custom = service.create_lora_training_client(tiny_model, rank=4, seed=7)
    for client in (builtin, custom):  # a first step so LoRA B is non-zero
        client.forward_backward(only(batch(0), "target_tokens", "weights"), "cross_entropy")
        client.optim_step(LR).result()
    keys = LOSSES[loss_fn].required + (("weights",) if loss_fn == "cross_entropy" else ())
    data = only(batch(1), *keys)
    config = resolve_config(loss_fn, None)

    def my_loss(data, logprobs):
        inputs = {
            k: torch.cat([d.loss_fn_inputs[k].to_torch() for d in data])
            for k in keys
            if k != "target_tokens"
        }
        loss, _ = LOSSES[loss_fn].fn(torch.cat(logprobs), inputs, config)
        return loss, {"custom:sum": 1.0}

    expected = builtin.forward_backward(data, loss_fn).result()
    got = custom.forward_backward_custom(data, my_loss).result()
    assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
    assert got.metrics["custom:sum"] == 1.0 and "surrogate_loss:sum" in got.metrics
    steps = [c.optim_step(LR).result().metrics["grad_norm:mean"] for c in (builtin, custom)]
    assert steps[0] == pytest.approx(steps[1], rel=1e-4)
    probe = only(batch(60), "target_tokens", "weights")
    a = builtin.forward(probe).result().loss_fn_outputs[1]["logprobs"].to_torch()
    b = custom.forward(probe).result().loss_fn_outputs[1]["logprobs"].to_torch()
    assert torch.allclose(a, b, atol=1e-5)


def test_state_roundtrip_through_the_service(service, tiny_model):
    client = service.create_lora_training_client(tiny_model, rank=4, seed=3)
    client.forward_backward(only(batch(0), "target_tokens", "weights"), "cross_entropy")
    client.optim_step(LR)
    path = client.save_state("roundtrip").result().path
    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert resumed.get_info().lora_config == client.get_info().lora_config
    for c in (client, resumed):
        c.forward_backward(only(batch(1), "target_tokens", "weights"), "cross_entropy")
        metrics = c.optim_step(LR).result().metrics
        assert metrics["step:max"] == 2.0
    probe = only(batch(70), "target_tokens", "weights")
    a = client.forward(probe).result().loss_fn_outputs[0]["logprobs"].to_torch()
    b = resumed.forward(probe).result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert torch.equal(a, b)


def test_get_tokenizer_and_info(service, tiny_model):
    client = service.create_lora_training_client(tiny_model, rank=4, seed=0, train_unembed=False)
    info = client.get_info()
    assert info.lora_rank == 4 and info.model_data.vocab_size == 49152
    assert info.lora_config.train_unembed is False
    tokenizer = client.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
