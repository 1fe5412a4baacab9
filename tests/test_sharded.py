"""The sharded trainer (TrainerConfig.world_size=2: two Ray actors, gloo, FSDP2) against the
one-actor trainer on the same tiny model: the same logprobs, losses and gradient norms, world-
size-independent checkpoints, the same errors for bad input, and a rank's death that names the
rank and rebuilds the group from the last save."""

from __future__ import annotations

import random
import time

import pytest
import ray
import test_bad_input as bad
import torch
from safetensors.torch import load_file

from rl import types
from rl.errors import CheckpointError, InvalidRequestError, TrainerRestartedError
from rl.futures import ray_get
from rl.types import AdamParams, Datum, ModelInput
from trainers import TrainerConfig

LR = AdamParams(learning_rate=2e-2)
RTOL, ATOL = 1e-4, 1e-4  # fp32 sums in another order (per rank, then all-reduced)


def batch(seed: int, size: int = 5) -> list[Datum]:
    """`size` datums of uneven lengths (3..20 tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(size):
        n = rng.randrange(3, 21)
        tokens = [rng.randrange(1000) for _ in range(n + 1)]
        out.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * n},
            )
        )
    return out


def squared_logprobs(data, logprobs):
    """A custom loss the built-in table does not have."""
    loss = sum((lp**2).sum() for lp in logprobs)
    return loss, {"custom:sum": loss.item()}


def make_service(tmp_path_factory, world_size: int):
    from rl import ServiceClient
    from samplers.config import SamplerConfig

    config = TrainerConfig(
        dtype="float32",
        num_threads=1,
        num_cpus=0.1,
        world_size=world_size,
        # Small buckets: several model calls per batch, and unequal counts on the two ranks.
        max_tokens_per_batch=32,
        checkpoint_dir=str(tmp_path_factory.mktemp(f"ckpt{world_size}")),
    )
    sampler = SamplerConfig(engine="torch", dtype="float32", num_actors=1, num_cpus_per_actor=0.05)
    return ServiceClient(trainer_config=config, sampler_config=sampler)


@pytest.fixture(scope="module")
def one(ray_local, tmp_path_factory):
    service = make_service(tmp_path_factory, 1)
    yield service
    service.close()


@pytest.fixture(scope="module")
def two(ray_local, tmp_path_factory):
    service = make_service(tmp_path_factory, 2)
    yield service
    service.close()


def logprobs(client, data=None) -> list[torch.Tensor]:
    out = client.forward(data or batch(99)).result()
    return [o["logprobs"].to_torch() for o in out.loss_fn_outputs]


def assert_close(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


def step(client, seed: int, size: int = 5) -> tuple[types.ForwardBackwardOutput, float]:
    """One optimizer step: cross-entropy on `batch(seed, size)`, then the custom loss on
    another batch, accumulated into the same step."""
    out = client.forward_backward(batch(seed, size), "cross_entropy")
    client.forward_backward_custom(batch(seed + 100, 3), squared_logprobs)
    norm = client.optim_step(LR).result().metrics["grad_norm:mean"]
    return out.result(), norm


def test_two_ranks_match_one(one, two, tiny_model):
    a = one.create_lora_training_client(tiny_model, rank=4, seed=11)
    b = two.create_lora_training_client(tiny_model, rank=4, seed=11)
    assert_close(logprobs(a), logprobs(b))
    # Odd batches split unevenly; a one-datum batch leaves rank 1 with idle model calls only.
    for seed, size in ((1, 5), (2, 7), (3, 1)):
        (out_a, norm_a), (out_b, norm_b) = step(a, seed, size), step(b, seed, size)
        assert_close(
            [o["logprobs"].to_torch() for o in out_a.loss_fn_outputs],
            [o["logprobs"].to_torch() for o in out_b.loss_fn_outputs],
        )
        assert out_b.metrics["loss:sum"] == pytest.approx(out_a.metrics["loss:sum"], rel=RTOL)
        assert norm_b == pytest.approx(norm_a, rel=RTOL)
    assert_close(logprobs(a), logprobs(b))
    # The merged export gathers the sharded base weights whole.
    merged_a = ray_get(a.trainer_actor.merged_weights.remote(a.model_id))
    merged_b = ray_get(b.trainer_actor.merged_weights.remote(b.model_id))
    assert merged_a.keys() == merged_b.keys()
    for key, value in merged_a.items():
        torch.testing.assert_close(merged_b[key], value, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_sampler_sync(two, tiny_model, mode):
    """The samplers get the weights of a sharded trainer (the sync's own check compares the
    sampler's logprobs with the trainer's, and raises if they differ)."""
    client = two.create_lora_training_client(tiny_model, rank=4, seed=17)
    step(client, 14)
    sampler = client.save_weights_and_get_sampling_client(sync_mode=mode)
    assert sampler.sync_metrics["sync/logprob_diff_max"] < 1e-3
    tokens = batch(15, 1)[0].model_input.to_ints()
    sampled = sampler.compute_logprobs(ModelInput.from_ints(tokens)).result()[1:]
    trained = logprobs(
        client,
        [
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        ],
    )
    assert sampled == pytest.approx(trained[0].tolist(), abs=1e-4)


def test_checkpoint_moves_between_world_sizes(one, two, tiny_model):
    origin = two.create_lora_training_client(tiny_model, rank=4, seed=12)
    step(origin, 4)
    path = origin.save_state("at-two").result().path
    resumed = [
        one.create_training_client_from_state_with_optimizer(path),
        two.create_training_client_from_state_with_optimizer(path),
    ]
    norms = [step(client, 5)[1] for client in [origin, *resumed]]
    assert norms[1] == pytest.approx(norms[0], rel=RTOL)
    assert norms[2] == pytest.approx(norms[0], rel=RTOL)
    for client in resumed:
        assert_close(logprobs(client), logprobs(origin))
    # The sampler export is the same PEFT directory at either world size.
    exports = [
        load_file(f"{c.save_weights_for_sampler('peft').result().path}/adapter_model.safetensors")
        for c in resumed
    ]
    assert exports[0].keys() == exports[1].keys()
    for key, value in exports[0].items():
        torch.testing.assert_close(exports[1][key], value, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "case", ["target outside vocab", "missing key", "inf advantages", "missing checkpoint"]
)
def test_bad_input_fails_alike(one, two, tiny_model, case):
    call, message = bad.BAD_CALLS[case]
    errors, before, after, norms = [], [], [], []
    for service in (one, two):
        client = service.create_lora_training_client(tiny_model, rank=4, seed=13)
        client.forward_backward(batch(6), "cross_entropy").result()  # a pending gradient
        before.append(logprobs(client))
        with pytest.raises((InvalidRequestError, CheckpointError)) as error:
            call(client).result()
        assert error.match(message)
        errors.append(str(error.value))
        after.append(logprobs(client))
        norms.append(step(client, 7)[1])
        assert service.hosts[tiny_model].generation == 0  # no restart
    assert errors[0] == errors[1]
    assert_close(after[0], before[0])
    assert_close(after[1], before[1])
    assert norms[1] == pytest.approx(norms[0], rel=RTOL)


def test_non_finite_loss_fails_alike(one, two, tiny_model):
    """Found on a rank mid-call (not by validation): all ranks drop the call's gradient."""
    gap = Datum(  # the sampler's logprobs far below the trainer's: the ratio overflows
        model_input=ModelInput.from_ints(list(range(20, 26))),
        loss_fn_inputs={
            "target_tokens": list(range(10, 16)),
            "logprobs": [-1e4] * 6,
            "advantages": [1.0] * 6,
        },
    )
    sane = [
        Datum(
            model_input=d.model_input, loss_fn_inputs={**gap.loss_fn_inputs, "logprobs": [-5.0] * 6}
        )
        for d in (gap, gap)
    ]
    errors, norms = [], []
    for service in (one, two):
        client = service.create_lora_training_client(tiny_model, rank=4, seed=14)
        client.forward_backward(batch(8), "cross_entropy").result()
        with pytest.raises(InvalidRequestError, match="loss is") as error:
            client.forward_backward([*sane, gap], "importance_sampling").result()
        errors.append(str(error.value))
        norms.append(client.optim_step(LR).result().metrics["grad_norm:mean"])
    assert errors[0] == errors[1]
    assert norms[1] == pytest.approx(norms[0], rel=RTOL)


@pytest.mark.timeout(600)
def test_a_dead_rank_is_named_and_the_group_rebuilt(two, tiny_model):
    saved = two.create_lora_training_client(tiny_model, rank=4, seed=15)
    step(saved, 9)
    saved.save_state("before-kill").result()
    saved_logprobs = logprobs(saved)
    changed = two.create_lora_training_client(tiny_model, rank=4, seed=16)
    changed.save_state("changed-start").result()
    changed_logprobs = logprobs(changed)
    step(changed, 10)  # lost in the restart

    host = two.hosts[tiny_model]
    old_ranks = list(host.ranks)
    pending = changed.forward_backward(batch(11, 9), "cross_entropy")
    ray.kill(old_ranks[1])  # mid-call, or just before it: the same outcome
    began = time.perf_counter()
    with pytest.raises(TrainerRestartedError) as error:
        pending.result(timeout=500)
    assert "trainer rank 1 of 2" in str(error.value)
    assert error.value.lost == ["forward_backward", "forward_backward_custom", "optim_step"]
    print(f"rank death to rebuilt group: {time.perf_counter() - began:.1f}s")
    assert all(rank not in old_ranks for rank in host.ranks) and len(host.ranks) == 2
    # Both clients go on from their saves on the new group.
    assert_close(logprobs(changed), changed_logprobs)
    assert_close(logprobs(saved), saved_logprobs)
    step(saved, 12)


def test_split_balances_tokens():
    from trainers.distributed import split

    # Longest first, each to the rank with fewer tokens: 9 | 7, then 5 -> rank 1 (7), ...
    assert split([9, 7, 5, 3, 1], 2) == [[0, 3, 4], [1, 2]]  # 13 vs 12 tokens
    assert split([4], 2) == [[0], []]  # rank 1 only makes idle calls
    assert split([2, 2, 2], 1) == [[0, 1, 2]]
