"""Sampler pools with the torch engine: concurrency, weight syncs, bad input, actor deaths.

Uses the session's embedded Ray and a ServiceClient whose samplers run the torch engine on the
tiny model (fast to start and restart); tests/test_sampler_vllm.py covers the vLLM engine.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import ray

from rl.client import weight_sync
from rl.client.sampling import SamplingClient
from rl.errors import CheckpointError, InvalidRequestError, NotFoundError, WeightSyncError
from rl.types import AdamParams, Datum, ModelInput, SamplingParams
from samplers.config import SamplerConfig

PROMPT = ModelInput.from_ints([1, 504, 3458, 314, 4649, 314, 253])
SEQUENCE = [1, 504, 3458, 314, 4649, 314, 253, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def sampling_service(ray_local, tmp_path_factory):
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
            engine="torch",
            dtype="float32",
            num_actors=2,
            num_cpus_per_actor=0.05,
            max_model_len=256,
            max_lora_rank=8,
        ),
    )
    yield client
    client.close()


@pytest.fixture(scope="module")
def base_client(sampling_service, tiny_model) -> SamplingClient:
    return sampling_service.create_sampling_client(base_model=tiny_model)


def train_step(training_client, target: list[int], lr: float = 1e-2) -> None:
    datum = Datum(
        model_input=ModelInput.from_ints(target[:-1]),
        loss_fn_inputs={"target_tokens": target[1:], "weights": [1.0] * (len(target) - 1)},
    )
    training_client.forward_backward([datum], "cross_entropy")
    training_client.optim_step(AdamParams(learning_rate=lr)).result()


def trainer_logprobs(training_client, tokens: list[int]) -> list[float]:
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    return training_client.forward([datum]).result().loss_fn_outputs[0]["logprobs"].tolist()


def sampler_logprobs(client: SamplingClient, tokens: list[int]) -> list[float]:
    logprobs = client.compute_logprobs(ModelInput.from_ints(tokens)).result()
    assert logprobs[0] is None
    return logprobs[1:]


def test_many_concurrent_requests_spread(base_client):
    pool = base_client.pool
    before = [ray.get(h.held.remote())["served"] for h in pool.actor_handles()]
    params = SamplingParams(max_tokens=4, seed=1)
    futures = [base_client.sample(PROMPT, 1, params) for _ in range(300)]
    responses = [f.result(timeout=120) for f in futures]
    assert all(len(r.sequences[0].tokens) == 4 for r in responses)
    # Same seed and prompt: the same tokens, whichever actor served it.
    assert len({tuple(r.sequences[0].tokens) for r in responses}) == 1
    after = [ray.get(h.held.remote())["served"] for h in pool.actor_handles()]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 300
    assert min(served) > 50  # both actors took a share


def test_bad_input_is_rejected_and_pool_keeps_serving(base_client, sampling_service):
    bad_calls = [
        lambda: base_client.sample(ModelInput.empty(), 1, SamplingParams(max_tokens=2)),
        lambda: base_client.sample(ModelInput.from_ints([1, 10**6]), 1, SamplingParams()),
        lambda: base_client.sample(PROMPT, 1, SamplingParams(max_tokens=0)),
        lambda: base_client.sample(PROMPT, 1, SamplingParams(max_tokens=10_000)),
        lambda: base_client.sample(PROMPT, 0, SamplingParams(max_tokens=2)),
        lambda: base_client.sample(PROMPT, 1, SamplingParams(max_tokens=2, top_p=0.0)),
        lambda: base_client.sample(PROMPT, 1, SamplingParams(max_tokens=2, temperature=-0.5)),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidRequestError):
            call()
    with pytest.raises(CheckpointError, match="not a directory"):
        sampling_service.create_sampling_client(model_path="/nonexistent/sampler_weights/x")
    with pytest.raises(InvalidRequestError, match="tinker://"):
        sampling_service.create_sampling_client(model_path="tinker://run/sampler_weights/x")
    with pytest.raises(InvalidRequestError, match="model_path or base_model"):
        sampling_service.create_sampling_client()
    response = base_client.sample(PROMPT, 2, SamplingParams(max_tokens=3)).result()
    assert [len(s.tokens) for s in response.sequences] == [3, 3]


def test_malformed_checkpoint_is_rejected(sampling_service, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"adapter_config\.json"):
        sampling_service.create_sampling_client(model_path=str(tmp_path))


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_sync_follows_training(sampling_service, tiny_model, mode):
    training_client = sampling_service.create_lora_training_client(tiny_model, rank=8, seed=1)
    first = training_client.save_weights_and_get_sampling_client(sync_mode=mode)
    before = sampler_logprobs(first, SEQUENCE)
    train_step(training_client, SEQUENCE)
    second = training_client.save_weights_and_get_sampling_client(sync_mode=mode)
    after = sampler_logprobs(second, SEQUENCE)
    assert after == pytest.approx(trainer_logprobs(training_client, SEQUENCE), abs=1e-4)
    assert sum(after) > sum(before) + 0.5  # trained towards SEQUENCE
    assert second.sync_metrics["sync/logprob_diff_mean"] < 1e-3
    assert "time/sync_s" in second.sync_metrics
    if mode == "adapter":
        # Snapshot semantics: the older client still samples the older adapter.
        assert sampler_logprobs(first, SEQUENCE) == pytest.approx(before, abs=1e-5)


def test_two_adapters_served_at_once(sampling_service, tiny_model):
    clients = [
        sampling_service.create_lora_training_client(tiny_model, rank=8, seed=s) for s in (2, 3)
    ]
    train_step(clients[0], SEQUENCE)
    train_step(clients[1], list(reversed(SEQUENCE)))
    samplers = [c.save_weights_and_get_sampling_client(sync_mode="adapter") for c in clients]
    assert samplers[0].pool is samplers[1].pool  # one engine serves both
    futures = [
        s.compute_logprobs(ModelInput.from_ints(SEQUENCE)) for s in samplers for _ in range(5)
    ]
    results = [f.result()[1:] for f in futures]
    for i, client in enumerate(clients):
        expected = trainer_logprobs(client, SEQUENCE)
        for result in results[5 * i : 5 * i + 5]:
            assert result == pytest.approx(expected, abs=1e-4)
    assert abs(sum(results[0]) - sum(results[5])) > 0.1


def test_stale_sync_raises(sampling_service, tiny_model):
    """Pushing the pre-step weights as the new version is caught by the probe check."""
    training_client = sampling_service.create_lora_training_client(tiny_model, rank=8, seed=4)
    training_client.save_weights_and_get_sampling_client(sync_mode="merged")
    stale = training_client.trainer_actor.merged_weights.remote(training_client.model_id)
    train_step(training_client, SEQUENCE, lr=1e-3)  # a small step
    pending = training_client.begin_weight_sync("merged").result()
    with pytest.raises(WeightSyncError, match="previous weights"):
        weight_sync.finish(dataclasses.replace(pending, source=stale))
    # The adapter path: an adapter from another training client is "wrong weights".
    other = sampling_service.create_lora_training_client(tiny_model, rank=8, seed=5)
    train_step(other, list(reversed(SEQUENCE)))
    wrong = other.trainer_actor.adapter_weights.remote(other.model_id)
    pending = training_client.begin_weight_sync("adapter").result()
    with pytest.raises(WeightSyncError):
        weight_sync.finish(dataclasses.replace(pending, source=wrong))


def test_sync_takes_the_weights_at_its_place_in_the_queue(sampling_service, tiny_model):
    """The trainer may go on while the samplers load a sync (`begin_weight_sync` / `finish`):
    the samplers still get the weights as of the sync, and the check still passes."""
    training_client = sampling_service.create_lora_training_client(tiny_model, rank=8, seed=10)
    train_step(training_client, SEQUENCE)
    pending = training_client.begin_weight_sync("merged").result()
    expected = trainer_logprobs(training_client, SEQUENCE)  # queued after the sync's export
    train_step(training_client, SEQUENCE)  # the trainer moves on before the samplers load
    client = weight_sync.finish(pending)
    assert sampler_logprobs(client, SEQUENCE) == pytest.approx(expected, abs=1e-4)
    latest = trainer_logprobs(training_client, SEQUENCE)
    assert abs(sum(latest) - sum(expected)) > 1e-3
    # Syncs of one client finish in the order they began: the second waits for the first.
    first = training_client.begin_weight_sync("merged").result()
    second = training_client.begin_weight_sync("merged").result()
    finished: list[SamplingClient] = []
    waiter = threading.Thread(target=lambda: finished.append(weight_sync.finish(second)))
    waiter.start()
    waiter.join(timeout=2.0)
    assert waiter.is_alive() and not finished
    older = weight_sync.finish(first)
    waiter.join(timeout=120)
    (newer,) = finished
    assert newer.weights.version > older.weights.version
    assert sampler_logprobs(newer, SEQUENCE) == pytest.approx(latest, abs=1e-4)


def test_sample_from_saved_checkpoint(sampling_service, tiny_model):
    training_client = sampling_service.create_lora_training_client(tiny_model, rank=8, seed=6)
    train_step(training_client, SEQUENCE)
    path = training_client.save_weights_for_sampler("step1").result().path
    client = sampling_service.create_sampling_client(model_path=path)
    assert client.get_base_model() == tiny_model
    expected = trainer_logprobs(training_client, SEQUENCE)
    assert sampler_logprobs(client, SEQUENCE) == pytest.approx(expected, abs=1e-4)
    again = sampling_service.create_sampling_client(model_path=path)
    assert again.weights == client.weights  # loaded once


def test_old_versions_expire(sampling_service, tiny_model):
    training_client = sampling_service.create_lora_training_client(tiny_model, rank=8, seed=7)
    oldest = training_client.save_weights_and_get_sampling_client(sync_mode="adapter")
    keep = sampling_service.pools.config.max_versions_per_model
    for _ in range(keep):
        latest = training_client.save_weights_and_get_sampling_client(sync_mode="adapter")
    with pytest.raises(NotFoundError, match="no longer loadable"):
        oldest.sample(PROMPT, 1, SamplingParams(max_tokens=2)).result()
    assert len(latest.sample(PROMPT, 1, SamplingParams(max_tokens=2)).result().sequences) == 1
    held = [ray.get(h.held.remote())["adapters"] for h in latest.pool.actor_handles()]
    versions = [
        v
        for actor in held
        for v, (model, _, _) in actor.items()
        if model == training_client.model_id
    ]
    assert set(versions) == {latest.weights.version}  # superseded, idle versions are unloaded


def test_killed_actor_loses_no_request(sampling_service, tiny_model):
    training_client = sampling_service.create_lora_training_client(tiny_model, rank=8, seed=8)
    train_step(training_client, SEQUENCE)
    client = training_client.save_weights_and_get_sampling_client(sync_mode="adapter")
    pool = client.pool
    params = [SamplingParams(max_tokens=24, seed=i) for i in range(40)]
    reference = {
        i: client.sample(PROMPT, 1, p).result().sequences[0].tokens
        for i, p in enumerate(params[:6])
    }
    victim = pool.actor_handles()[0]
    incarnation = ray.get(victim.held.remote())["incarnation"]
    futures = [client.sample(PROMPT, 1, p) for p in params]
    deadline = time.monotonic() + 30
    while pool.inflight()[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.inflight()[0] >= 5, "no request reached the first actor"
    ray.kill(victim, no_restart=False)  # a crash: Ray restarts it
    responses = [f.result(timeout=120) for f in futures]
    assert len(responses) == 40
    for i, response in enumerate(responses):
        assert len(response.sequences) == 1
        assert len(response.sequences[0].tokens) == 24
        if i in reference:  # retried requests give the seeded answer, from the trained weights
            assert response.sequences[0].tokens == reference[i]
    # The actor is restarted and serves again, with the adapter pushed to it anew.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if ray.get(victim.held.remote(), timeout=5)["incarnation"] != incarnation:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    new_incarnation = ray.get(victim.held.remote())["incarnation"]
    assert new_incarnation != incarnation
    deadline = time.monotonic() + 30
    while pool.inflight() and not all(s.live for s in pool._slots) and time.monotonic() < deadline:
        time.sleep(0.1)
    futures = [client.sample(PROMPT, 1, params[i]) for i in range(6) for _ in range(10)]
    results = [f.result(timeout=60) for f in futures]
    assert [r.sequences[0].tokens for r in results] == [
        reference[i] for i in range(6) for _ in range(10)
    ]
    assert ray.get(victim.held.remote())["served"] > 0


def test_old_version_serves_its_running_requests(sampling_service, tiny_model):
    """A sync while requests for the previous version run: they finish on the old adapter,
    which is unloaded only afterwards."""
    training_client = sampling_service.create_lora_training_client(tiny_model, rank=8, seed=9)
    train_step(training_client, SEQUENCE)
    old = training_client.save_weights_and_get_sampling_client(sync_mode="adapter")
    params = [SamplingParams(max_tokens=32, seed=i) for i in range(40)]
    reference = [old.sample(PROMPT, 1, params[i]).result().sequences[0].tokens for i in range(4)]
    train_step(training_client, SEQUENCE)  # the old client still samples version 1
    handles = old.pool.actor_handles()
    deferred_before = sum(ray.get(h.held.remote())["deferred_unloads"] for h in handles)
    futures = [old.sample(PROMPT, 1, p) for p in params]
    new = training_client.save_weights_and_get_sampling_client(sync_mode="adapter")
    # The overlap is recorded by the actors when the new version arrives (the sync itself
    # returns only after its probe requests, which may queue behind these).
    deferred = sum(ray.get(h.held.remote())["deferred_unloads"] for h in handles)
    assert deferred > deferred_before, "the sync did not overlap the requests"
    results = [f.result(timeout=120).sequences[0].tokens for f in futures]
    assert results[:4] == reference
    assert new.sample(PROMPT, 1, params[0]).result().sequences[0].tokens != reference[0]
    held = [ray.get(h.held.remote())["adapters"] for h in new.pool.actor_handles()]
    versions = {
        v for actor in held for v, (m, _, _) in actor.items() if m == training_client.model_id
    }
    assert versions == {new.weights.version}
