"""The whole sampler stack with vLLM engines in Ray actors: syncs in both modes, two adapters
on one engine, bad input, and an actor killed while requests are in flight.

Slow: each vLLM engine takes 10-20 s to start on CPU. The tiny model has hidden size 128
(vLLM's CPU attention needs head sizes that are multiples of 32).
"""

from __future__ import annotations

import time

import pytest
import ray

from rl.errors import InvalidRequestError
from rl.types import AdamParams, Datum, ModelInput, SamplingParams
from samplers.config import SamplerConfig

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

PROMPT = ModelInput.from_ints([1, 504, 3458, 314, 4649, 314, 253])
SEQUENCE = [1, 504, 3458, 314, 4649, 314, 253, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from rl import ServiceClient
    from trainers import TrainerConfig

    client = ServiceClient(
        trainer_config=TrainerConfig(
            dtype="float32",
            num_threads=2,
            num_cpus=0.1,  # slivers: the session's Ray has 2 CPUs (conftest.py)
            checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")),
        ),
        sampler_config=SamplerConfig(
            engine="vllm",
            dtype="float32",
            num_actors=2,
            num_cpus_per_actor=0.05,
            enforce_eager=True,
            max_model_len=256,
            kv_cache_gib=0.25,
            max_loras=2,
            max_lora_rank=8,
        ),
    )
    yield client
    client.close()


def datum(tokens: list[int]) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def train_step(training_client, tokens: list[int]) -> None:
    training_client.forward_backward([datum(tokens)], "cross_entropy")
    training_client.optim_step(AdamParams(learning_rate=1e-2)).result()


def trainer_logprobs(training_client, tokens: list[int]) -> list[float]:
    return training_client.forward([datum(tokens)]).result().loss_fn_outputs[0]["logprobs"].tolist()


def sampler_logprobs(client, tokens: list[int]) -> list[float]:
    return client.compute_logprobs(ModelInput.from_ints(tokens)).result()[1:]


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_sync_follows_training(service, vllm_tiny_model, mode):
    # train_unembed=True (the default): vLLM serves the lm_head LoRA in adapter mode, and
    # merged mode unties the output head from the input embedding.
    training_client = service.create_lora_training_client(vllm_tiny_model, rank=8, seed=1)
    first = training_client.save_weights_and_get_sampling_client(sync_mode=mode)
    before = sampler_logprobs(first, SEQUENCE)
    train_step(training_client, SEQUENCE)
    second = training_client.save_weights_and_get_sampling_client(sync_mode=mode)
    after = sampler_logprobs(second, SEQUENCE)
    assert after == pytest.approx(trainer_logprobs(training_client, SEQUENCE), abs=1e-4)
    assert sum(after) > sum(before) + 0.5
    assert second.sync_metrics["sync/logprob_diff_mean"] < 1e-3
    response = second.sample(PROMPT, 3, SamplingParams(max_tokens=6, seed=2)).result()
    assert [len(s.tokens) for s in response.sequences] == [6, 6, 6]


def test_two_adapters_on_one_engine(service, vllm_tiny_model):
    clients = [service.create_lora_training_client(vllm_tiny_model, rank=8, seed=s) for s in (2, 3)]
    train_step(clients[0], SEQUENCE)
    train_step(clients[1], list(reversed(SEQUENCE)))
    samplers = [c.save_weights_and_get_sampling_client(sync_mode="adapter") for c in clients]
    # Interleaved, concurrent requests for both adapters.
    futures = []
    for _ in range(4):
        for client in samplers:
            futures.append(client.compute_logprobs(ModelInput.from_ints(SEQUENCE)))
            futures.append(client.sample(PROMPT, 2, SamplingParams(max_tokens=8, seed=5)))
    results = [f.result(timeout=300) for f in futures]
    scores = results[0::2]
    for i, client in enumerate(clients):
        expected = trainer_logprobs(client, SEQUENCE)
        for score in scores[i::2]:
            assert score[1:] == pytest.approx(expected, abs=1e-4)
    assert abs(sum(scores[0][1:]) - sum(scores[1][1:])) > 0.1
    samples = results[1::2]
    assert samples[0].sequences[0].tokens != samples[1].sequences[0].tokens


def test_bad_input_then_killed_actor(service, vllm_tiny_model):
    training_client = service.create_lora_training_client(vllm_tiny_model, rank=8, seed=4)
    client = training_client.save_weights_and_get_sampling_client(sync_mode="adapter")
    for params, num_samples, prompt in [
        (SamplingParams(max_tokens=0), 1, PROMPT),
        (SamplingParams(max_tokens=1000), 1, PROMPT),
        (SamplingParams(max_tokens=4, top_p=2.0), 1, PROMPT),
        (SamplingParams(max_tokens=4), 0, PROMPT),
        (SamplingParams(max_tokens=4), 1, ModelInput.from_ints([1, 49152])),
        (SamplingParams(max_tokens=4), 1, ModelInput.empty()),
    ]:
        with pytest.raises(InvalidRequestError):
            client.sample(prompt, num_samples, params)
    pool = client.pool
    params = [SamplingParams(max_tokens=32, seed=i) for i in range(24)]
    reference = client.sample(PROMPT, 1, params[0]).result().sequences[0].tokens
    futures = [client.sample(PROMPT, 1, p) for p in params]
    deadline = time.monotonic() + 30
    while pool.inflight()[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    victim = pool.actor_handles()[0]
    ray.kill(victim, no_restart=False)
    responses = [f.result(timeout=300) for f in futures]
    assert [len(r.sequences[0].tokens) for r in responses] == [32] * 24
    assert responses[0].sequences[0].tokens == reference
    # Ray restarts it, and the pool takes it back.
    deadline = time.monotonic() + 180
    while not all(slot.live for slot in pool._slots) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(slot.live for slot in pool._slots)
    assert ray.get(victim.held.remote())["served"] == 0  # a fresh process
    more = [client.sample(PROMPT, 1, params[0]) for _ in range(8)]
    assert all(r.result(timeout=120).sequences[0].tokens == reference for r in more)
