"""A server a lab can watch and bound: `GET /metrics` (Prometheus text) counts each tenant's
calls, tokens and errors and shows queues, models and the actors' memory; the per-tenant caps
on models and on calls in flight refuse, queue or answer 429 as docs/server.md says, and no
request the SDK makes fails because of them.

One server on a thread over the session's Ray, with a tiny random model, caps of two models
and two calls in flight per tenant, and the torch sampling engine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from rl.server import ServerConfig, build_service, start_in_thread
from rl.server.keys import KeyStore
from rl.server.limits import InflightGate
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TENANTS = ("alice", "bob", "carol")
LONG_SAMPLE = {"num_samples": 16, "sampling_params": {"max_tokens": 200, "stop": []}}


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_TELEMETRY", "0")
        config = ServerConfig(
            port=0,
            home=str(tmp_path_factory.mktemp("watch")),
            models=tiny_model,
            long_poll_s=2.0,
            max_chunk_datums=4,
            max_models_per_tenant=2,
            max_inflight_per_tenant=2,
            sampler=SamplerConfig(engine="torch", sync_mode="adapter", num_threads=1),
            trainer=TrainerConfig(dtype="float32", num_threads=1, num_cpus=0.1),
        )
        keys = KeyStore(config.resolved_keys_file())
        env = {name: keys.add(name) for name in TENANTS}
        service = build_service(config)
        running = start_in_thread(config, service)
        running.state.metrics.actors.ttl_s = 0.0  # every scrape asks the actors afresh
        yield {"url": running.url, "keys": env, "state": running.state}
        running.stop()
        service.close()


def sdk(server, who: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server["url"], api_key=server["keys"][who])


def raw(server, who: str) -> httpx.Client:
    headers = {"X-API-Key": server["keys"][who]}
    return httpx.Client(base_url=server["url"] + "/api/v1", headers=headers, timeout=60)


def scrape(server, **headers: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, by (name, labels)."""
    answer = httpx.get(server["url"] + "/metrics", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def matching(samples: dict, name: str, **labels: str) -> list[float]:
    """The values of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return [v for (n, ls), v in samples.items() if n == name and wanted <= ls]


def poll(http: httpx.Client, request_id: str) -> None:
    """Waits until the request has finished."""
    for _ in range(60):
        answer = http.post("/retrieve_future", json={"request_id": request_id})
        if answer.status_code != 408:  # 408: try_again
            assert answer.status_code == 200, answer.text
            return
    raise AssertionError(f"request {request_id} never finished")


def datums(lengths: tuple[int, ...], seed: int = 0) -> list[types.Datum]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        tokens = [rng.randrange(3000) for _ in range(n + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * n},
            )
        )
    return out


def test_metrics_count_each_tenants_calls_tokens_and_errors(server, tiny_model):
    bob = sdk(server, "bob")  # a session, nothing else: his counters stay still
    before = scrape(server)
    alice = sdk(server, "alice")
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=1).result()
    client.forward_backward(datums((5, 8, 3)), "cross_entropy").result()  # 16 tokens
    client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    sampler = client.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    reply = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=5)).result()
    out_of_vocabulary = types.Datum(
        model_input=types.ModelInput.from_ints([1, 10**7]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]},
    )
    with pytest.raises(Exception, match="vocab"):
        client.forward_backward([out_of_vocabulary], "cross_entropy").result()
    with raw(server, "alice") as http:
        assert http.post("/optim_step", json={"seq_id": 1}).status_code == 400

    after = scrape(server)
    delta = functools.partial(moved, before, after)
    assert delta("engineroom_calls_total", tenant="alice", call="forward_backward") == 2
    assert delta("engineroom_calls_total", tenant="alice", call="optim_step") == 1
    assert delta("engineroom_calls_total", tenant="alice", call="sample") == 1
    assert delta("engineroom_tokens_total", tenant="alice", kind="trained") == 16
    sampled = sum(len(s.tokens) for s in reply.sequences)
    assert sampled > 0
    assert delta("engineroom_tokens_total", tenant="alice", kind="sampled") == sampled
    errors = {"tenant": "alice", "call": "forward_backward", "category": "user"}
    assert delta("engineroom_errors_total", **errors) == 1
    assert (
        delta("engineroom_http_responses_total", route="POST /api/v1/optim_step", status="400") == 1
    )
    assert delta("engineroom_call_seconds_count", call="forward_backward") == 2
    assert value(after, "engineroom_http_request_seconds_count", route="POST /api/v1/asample") >= 1
    for name in ("engineroom_calls_total", "engineroom_tokens_total", "engineroom_errors_total"):
        assert sum(matching(after, name, tenant="bob")) == sum(matching(before, name, tenant="bob"))
    assert value(after, "engineroom_models_alive", tenant="alice") == 1
    assert value(after, "engineroom_limit", limit="max_models_per_tenant") == 2
    assert_actor_gauges(server)
    alice.close("success").result()
    bob.close("success").result()


def assert_actor_gauges(server) -> None:
    """The trainer's adapters and memory, and the actors' RSS, are there and positive (the
    trainer may answer a scrape later)."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(server)
        found = {
            "adapters": matching(samples, "engineroom_trainer_adapters"),
            "resident": matching(samples, "engineroom_trainer_adapters_resident"),
            "peak": matching(samples, "engineroom_trainer_peak_rss_bytes"),
            "trainer rss": matching(samples, "engineroom_actor_rss_bytes", role="trainer"),
            "sampler rss": matching(samples, "engineroom_actor_rss_bytes", role="sampler"),
        }
        if all(values and min(values) > 0 for values in found.values()):
            return
        assert time.monotonic() < deadline, found
        time.sleep(0.5)


def test_metrics_can_require_a_key(server, monkeypatch):
    state = server["state"]
    monkeypatch.setattr(
        state, "config", dataclasses.replace(state.config, metrics_key_required=True)
    )
    url = server["url"] + "/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-API-Key": "tml-nope"}).status_code == 401
    key = server["keys"]["bob"]
    assert httpx.get(url, headers={"X-API-Key": key}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_the_model_cap_refuses_a_third_model_until_one_is_freed(server, tiny_model):
    before = scrape(server)
    carol, bob = sdk(server, "carol"), sdk(server, "bob")
    first = carol.create_lora_training_client(tiny_model, rank=4, seed=1).result()
    carol.create_lora_training_client(tiny_model, rank=4, seed=2).result()
    with pytest.raises(tinker.BadRequestError) as refused:
        carol.create_lora_training_client(tiny_model, rank=4, seed=3).result()
    message = str(refused.value)
    assert "--max_models_per_tenant=2" in message and "unload_model" in message
    assert "close" in message
    # Another tenant's models are counted apart.
    bob.create_lora_training_client(tiny_model, rank=4, seed=4).result()
    with raw(server, "carol") as http:
        assert http.post("/unload_model", json={"model_id": first.model_id}).status_code == 200
    third = carol.create_lora_training_client(tiny_model, rank=4, seed=3).result()
    assert third.forward(datums((4,)), "cross_entropy").result().loss_fn_outputs
    carol.close("success").result()
    bob.close("success").result()

    # A close is answered at once and releases in the background: wait for it.
    deadline = time.monotonic() + 60

    def closed(who: str) -> float:
        return moved(
            before, scrape(server), "engineroom_models_released_total", tenant=who, reason="close"
        )

    while time.monotonic() < deadline and (closed("carol"), closed("bob")) != (2, 1):
        time.sleep(0.2)
    after = scrape(server)
    delta = functools.partial(moved, before, after)
    assert delta("engineroom_limited_total", tenant="carol", limit="models") == 1
    errors = {"tenant": "carol", "call": "create_model", "category": "user"}
    assert delta("engineroom_errors_total", **errors) == 1
    assert delta("engineroom_models_released_total", tenant="carol", reason="unload") == 1
    assert delta("engineroom_models_released_total", tenant="carol", reason="close") == 2
    assert delta("engineroom_models_released_total", tenant="bob", reason="close") == 1
    assert value(after, "engineroom_models_alive", tenant="carol") == 0


def long_samples(http: httpx.Client, sampler_id: str, first_seq: int, n: int) -> list[Any]:
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
    body = {"sampling_session_id": sampler_id, "prompt": prompt, **LONG_SAMPLE}
    return [http.post("/asample", json={**body, "seq_id": first_seq + i}) for i in range(n)]


def test_a_burst_past_the_inflight_cap_queues_or_retries_and_all_complete(server, tiny_model):
    alice = sdk(server, "alice")
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=5).result()
    sampler = client.save_weights_and_get_sampling_client().result()
    before = scrape(server)
    with raw(server, "alice") as http:
        # Two long samples fill alice's two slots; a third is answered 429 with Retry-After.
        filling = long_samples(http, sampler._sampling_session_id, 10_000, 2)
        assert [a.status_code for a in filling] == [200, 200]
        (third,) = long_samples(http, sampler._sampling_session_id, 10_002, 1)
        assert third.status_code == 429 and third.headers["retry-after"] == "1", third.text
        assert "--max_inflight_per_tenant" in third.json()["detail"]
        # The SDK's calls meanwhile: training calls wait in the server (a batch of 10 is 3
        # chunks, dispatched in order as slots free), the sample is retried after its 429.
        batch = datums((3, 4, 5, 6, 2, 3, 4, 5, 6, 7))
        fbs = [client.forward_backward(batch, "cross_entropy") for _ in range(2)]
        optim = client.optim_step(types.AdamParams(learning_rate=1e-3))
        prompt = types.ModelInput.from_ints([4, 5, 6])
        samples = [sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3)) for _ in range(3)]
        assert all(len(fb.result().loss_fn_outputs) == 10 for fb in fbs)
        assert optim.result().metrics is not None
        assert all(len(s.result().sequences) == 1 for s in samples)
        for answer in filling:
            poll(http, answer.json()["request_id"])
    after = scrape(server)
    delta = functools.partial(moved, before, after)
    assert delta("engineroom_limited_total", tenant="alice", limit="inflight") >= 2
    assert delta("engineroom_calls_queued_total", tenant="alice") >= 1
    assert sum(matching(after, "engineroom_errors_total", tenant="alice")) == sum(
        matching(before, "engineroom_errors_total", tenant="alice")
    )
    assert value(after, "engineroom_calls_waiting", tenant="alice") == 0
    assert value(after, "engineroom_calls_inflight", tenant="alice") == 0
    alice.close("success").result()


def test_a_session_that_times_out_is_counted_as_such(server, tiny_model):
    """Last: ending idle sessions by hand ends every open one."""
    before = scrape(server)
    bob = sdk(server, "bob")
    bob.create_lora_training_client(tiny_model, rank=4, seed=6).result()
    server["state"].expire_sessions(time.time() + 10 * server["state"].config.session_timeout_s)
    after = scrape(server)
    timed_out = {"tenant": "bob", "reason": "session_timeout"}
    assert moved(before, after, "engineroom_models_released_total", **timed_out) == 1


def test_the_gate_keeps_each_tenants_order_and_cap():
    """The in-flight gate alone: calls past the cap start in the order they came, as slots
    free; a call that fails or finishes at once frees its slot."""
    gate = InflightGate(2)
    started: list[int] = []
    running: list[concurrent.futures.Future] = []

    def call(i: int) -> Callable[[], concurrent.futures.Future]:
        def start() -> concurrent.futures.Future:
            started.append(i)
            running.append(concurrent.futures.Future())
            return running[-1]

        return start

    proxies = [gate.run("t", call(i)) for i in range(5)]
    assert started == [0, 1] and gate.snapshot()["waiting"] == {"t": 3}
    assert not gate.has_room("t") and gate.has_room("u")
    for i in range(5):  # each finish starts the next waiting call, on the gate's thread
        deadline = time.monotonic() + 5
        while len(started) < min(i + 2, 5) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started == list(range(min(i + 2, 5)))  # never more than two at once, in order
        running[i].set_result(i)
        assert proxies[i].result(timeout=5) == i
    deadline = time.monotonic() + 5
    while gate.snapshot()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started == [0, 1, 2, 3, 4]
    assert gate.snapshot() == {"inflight": {}, "waiting": {}, "queued_total": {"t": 3}}

    def refused() -> concurrent.futures.Future:
        raise ValueError("bad input")

    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result("at once")
    with pytest.raises(ValueError, match="bad input"):
        gate.run("u", refused).result(timeout=5)
    assert gate.run("u", lambda: done).result(timeout=5) == "at once"
    assert gate.has_room("u") and gate.snapshot()["inflight"] == {}
    gate.close()
