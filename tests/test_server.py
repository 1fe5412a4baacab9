"""The Tinker-protocol server (rl.server) driven by the official `tinker` SDK over loopback.

The server runs on a thread of this process on a free port, over the session's Ray, with a
tiny random model and the torch sampling engine. Every training result is compared with the
same call through the in-process client API, so "works over HTTP" means "gives the same
numbers", not just "answers".
"""

from __future__ import annotations

import asyncio
import math
import random
import warnings

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from rl.server import ServerConfig, build_service, start_in_thread
from rl.server.keys import KeyStore
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
CHUNK = 4  # datums per forward_backward request: a batch of 10 goes as 3 chunks


@pytest.fixture(scope="module")
def server_env(ray_local, tiny_model, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    home = tmp_path_factory.mktemp("server")
    config = ServerConfig(
        port=0,
        home=str(home),
        models=tiny_model,
        sampler=SamplerConfig(engine="torch", sync_mode="adapter", num_threads=1),
        trainer=TrainerConfig(dtype="float32", num_threads=1),
        long_poll_s=2.0,
        max_chunk_datums=CHUNK,
        max_body_mib=1.0,
    )
    keys = KeyStore(config.resolved_keys_file())
    env = {"alice": keys.add("alice"), "bob": keys.add("bob")}
    service = build_service(config)
    running = start_in_thread(config, service)
    yield {
        "config": config,
        "url": running.url,
        "keys": env,
        "service": service,
        "running": running,
    }
    running.stop()
    service.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def alice(server_env):
    return tinker.ServiceClient(base_url=server_env["url"], api_key=server_env["keys"]["alice"])


@pytest.fixture(scope="module")
def bob(server_env):
    return tinker.ServiceClient(base_url=server_env["url"], api_key=server_env["keys"]["bob"])


def raw(server_env, who: str = "alice") -> httpx.Client:
    headers = {"X-API-Key": server_env["keys"][who]} if who else {}
    return httpx.Client(base_url=server_env["url"] + "/api/v1", headers=headers, timeout=60)


def datums(seed: int, lengths=(5, 8, 3)) -> list[types.Datum]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        tokens = [rng.randrange(3000) for _ in range(n + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "weights": [rng.choice([0.0, 1.0]) for _ in range(n)],
                },
            )
        )
    return out


def ours(data: list[types.Datum]):
    """The same datums as engineroom's own records."""
    from rl import types as rt

    return [
        rt.Datum(
            model_input=rt.ModelInput.from_ints(d.model_input.to_ints()),
            loss_fn_inputs={k: v.tolist() for k, v in d.loss_fn_inputs.items()},
        )
        for d in data
    ]


def logprobs_of(output) -> list[float]:
    """Every datum's target logprobs, concatenated."""
    return [float(x) for o in output.loss_fn_outputs for x in o["logprobs"].tolist()]


# -- the seed's snippet, unchanged but for `import tinker` ----------------------------------


def test_tinker_snippet_runs_unmodified(server_env, tiny_model, monkeypatch):
    monkeypatch.setenv("TINKER_BASE_URL", server_env["url"])
    monkeypatch.setenv("TINKER_API_KEY", server_env["keys"]["alice"])
    BASE = tiny_model

    async def user_code():
        service_client = tinker.ServiceClient()
        training_client = service_client.create_lora_training_client(base_model=BASE, rank=32)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens=[1, 2, 3, 4, 5, 6]),
            loss_fn_inputs={
                "weights": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
                "target_tokens": [2, 3, 4, 5, 6, 7],
            },
        )
        fwdbwd_future = await training_client.forward_backward_async(
            data=[datum], loss_fn="cross_entropy"
        )
        fwdbwd_result = await fwdbwd_future.result_async()
        optim_future = await training_client.optim_step_async(types.AdamParams(learning_rate=1e-4))
        return fwdbwd_result, await optim_future.result_async()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwdbwd_result, optim_result = asyncio.run(user_code())
    logprobs = np.asarray(fwdbwd_result.loss_fn_outputs[0]["logprobs"].tolist())
    assert logprobs.shape == (6,) and (logprobs < 0).all()
    assert fwdbwd_result.metrics["loss:sum"] == pytest.approx(-logprobs[2:].sum(), rel=1e-5)
    assert optim_result.metrics["step:max"] == 1.0


# -- training over HTTP equals training in process ------------------------------------------


def test_training_over_http_equals_in_process(server_env, alice, tiny_model):
    remote = alice.create_lora_training_client(tiny_model, rank=4, seed=11).result()
    local = server_env["service"].create_lora_training_client(tiny_model, rank=4, seed=11)
    adam = types.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)
    from rl.types import AdamParams as OurAdam

    for step in range(3):
        batch = datums(step, lengths=(5, 8, 3, 6, 2, 7, 4, 9, 5, 3))  # 10 datums: 3 chunks
        fb = remote.forward_backward(batch, "cross_entropy")
        opt = remote.optim_step(adam)  # submitted before waiting: same order server-side
        expected = local.forward_backward(ours(batch), "cross_entropy").result()
        expected_opt = local.optim_step(OurAdam(learning_rate=1e-2, grad_clip_norm=1.0)).result()
        got = fb.result()
        assert len(got.loss_fn_outputs) == 10
        assert logprobs_of(got) == pytest.approx(logprobs_of(expected), abs=1e-5)
        assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
        assert opt.result().metrics["grad_norm:mean"] == pytest.approx(
            expected_opt.metrics["grad_norm:mean"], rel=1e-4
        )
    info = remote.get_info()
    assert info.lora_rank == 4 and info.model_data.tokenizer_id
    assert remote.get_tokenizer().encode("hello")


def test_rl_losses_and_forward_only(alice, tiny_model):
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=2).result()
    rng = random.Random(0)
    tokens = [rng.randrange(3000) for _ in range(9)]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [-8.0] * 8,
            "advantages": [1.0, -1.0] * 4,
        },
    )
    before = client.forward([datum], "ppo").result()
    for loss in ("importance_sampling", "ppo", "cispo", "dro"):
        config = {"beta": 0.1} if loss == "dro" else None
        out = client.forward_backward([datum], loss, loss_fn_config=config).result()
        assert math.isfinite(out.metrics["loss:sum"])
    after = client.forward([datum], "ppo").result()  # no optim_step: weights unchanged
    assert logprobs_of(before) == logprobs_of(after)


def test_gspo_over_http_is_a_sequence_ratio_per_datum(alice, tiny_model):
    """gspo through the SDK, as cookbook 0.6.1's rl_loop builds it (prompt positions 0, a
    sequence_ratio_mask on the sampled tokens): the loss of the formula applied per datum to
    the logprobs returned."""
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=3).result()
    rng = random.Random(1)
    data, inputs = [], []
    for ob_len, sampled in ((3, 5), (6, 2)):
        n = ob_len + sampled
        tokens = [rng.randrange(1, 3000) for _ in range(n + 1)]
        q = [0.0] * ob_len + [-rng.uniform(10.0, 11.5) for _ in range(sampled)]  # p ~ -10.8
        a = [0.0] * ob_len + [rng.choice([-1.0, 1.0])] * sampled
        m = [0.0] * ob_len + [1.0] * sampled
        loss_fn_inputs = {
            "target_tokens": tokens[1:],
            "logprobs": q,
            "advantages": a,
            "sequence_ratio_mask": m,
        }
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=loss_fn_inputs
            )
        )
        inputs.append((q, a, m))
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}
    out = client.forward_backward(data, "gspo", loss_fn_config=config).result()
    expected, ratios = 0.0, []
    logprobs = [o["logprobs"].tolist() for o in out.loss_fn_outputs]
    for (q, a, m), p in zip(inputs, logprobs, strict=True):
        inside = [pt - qt for pt, qt, mt in zip(p, q, m, strict=True) if mt]
        s = math.exp(sum(inside) / len(inside))
        expected -= sum(min(s * at, min(max(s, 0.5), 1.5) * at) for at in a)
        ratios.append(s)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    assert out.metrics["ratio:mean"] == pytest.approx(sum(ratios) / 2, rel=1e-4)


def test_custom_loss_runs_client_side(alice, tiny_model):
    import torch

    client = alice.create_lora_training_client(tiny_model, rank=4, seed=5).result()
    twin = alice.create_lora_training_client(tiny_model, rank=4, seed=5).result()
    batch = datums(7)

    def loss_fn(data, logprobs):
        loss = sum(
            -(lp * torch.tensor(d.loss_fn_inputs["weights"].tolist())).sum()
            for d, lp in zip(data, logprobs, strict=True)
        )
        return loss, {"custom:sum": loss.item()}

    custom = client.forward_backward_custom(batch, loss_fn).result()
    builtin = twin.forward_backward(batch, "cross_entropy").result()
    assert custom.metrics["loss:sum"] == pytest.approx(builtin.metrics["loss:sum"], rel=1e-5)
    a = client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    b = twin.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert a.metrics["grad_norm:mean"] == pytest.approx(b.metrics["grad_norm:mean"], rel=1e-4)


# -- checkpoints, resume, REST --------------------------------------------------------------


def test_checkpoints_resume_and_rest(server_env, alice, tiny_model):
    client = alice.create_lora_training_client(
        tiny_model, rank=4, seed=3, user_metadata={"renderer_name": "role_colon"}
    ).result()
    adam = types.AdamParams(learning_rate=1e-2)
    client.forward_backward(datums(1), "cross_entropy")
    client.optim_step(adam).result()
    state = client.save_state("step1", ttl_seconds=7200, user_metadata={"step": "1"}).result()
    sampler = client.save_weights_for_sampler("step1").result()
    assert state.path == f"tinker://{client.model_id}/weights/step1"
    assert sampler.path == f"tinker://{client.model_id}/sampler_weights/step1"

    # The next step of the original, and of two clients resumed from the checkpoint.
    batch = datums(2)
    exact = alice.create_training_client_from_state_with_optimizer(state.path).result()
    fresh = alice.create_training_client_from_state(state.path).result()
    for c in (client, exact, fresh):
        c.forward_backward(batch, "cross_entropy")
    results = [c.optim_step(adam).result().metrics for c in (client, exact, fresh)]
    assert results[1]["step:max"] == results[0]["step:max"] == 2.0
    assert results[2]["step:max"] == 1.0  # weights only: a fresh optimizer
    after = [
        logprobs_of(c.forward(batch, "cross_entropy").result()) for c in (client, exact, fresh)
    ]
    assert after[0] == pytest.approx(after[1], abs=1e-6)
    assert after[0] != pytest.approx(after[2], abs=1e-6)  # Adam state matters

    rest = tinker.RestClient(base_url=server_env["url"], api_key=server_env["keys"]["alice"])
    run = rest.get_training_run(client.model_id).result()
    assert run.user_metadata == {"renderer_name": "role_colon"}
    assert run.last_checkpoint.tinker_path == state.path
    assert (
        rest.get_training_run_by_tinker_path(state.path).result().training_run_id == client.model_id
    )
    resumed_run = rest.get_training_run(exact.model_id).result()
    assert resumed_run.user_metadata == {"renderer_name": "role_colon"}  # carried over on load
    listed = rest.list_checkpoints(client.model_id).result().checkpoints
    assert {c.checkpoint_id for c in listed} == {"weights/step1", "sampler_weights/step1"}
    by_id = {c.checkpoint_id: c for c in listed}
    assert by_id["weights/step1"].user_metadata == {"step": "1"}
    assert by_id["weights/step1"].expires_at is not None
    assert client.model_id in {
        r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs
    }
    info = rest.get_weights_info_by_tinker_path(sampler.path).result()
    assert info.base_model == tiny_model and info.lora_rank == 4
    rest.set_checkpoint_ttl_from_tinker_path(state.path, None).result()
    assert rest.list_checkpoints(client.model_id).result().checkpoints[0].expires_at is None
    rest.delete_checkpoint_from_tinker_path(sampler.path).result()
    left = rest.list_checkpoints(client.model_id).result().checkpoints
    assert [c.checkpoint_id for c in left] == ["weights/step1"]
    assert any(
        c.tinker_path == state.path for c in rest.list_user_checkpoints().result().checkpoints
    )


def test_out_of_order_seq_ids_run_in_order(server_env, alice, tiny_model):
    """seq 2 (optim_step) arrives before seq 1 (forward_backward) and waits for it: run the
    other way round, the optim_step would fail for lack of a gradient."""
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=9).result()
    model_id = client.model_id
    from tinker.proto.request_conv import forward_backward_request_to_proto

    fb = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=datums(3), loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=1,
    )
    step = {"adam_params": {"learning_rate": 0.01}, "model_id": model_id, "seq_id": 2}
    with raw(server_env) as http:
        optim = http.post("/optim_step", json=step).json()
        first = http.post(
            "/forward_backward",
            content=forward_backward_request_to_proto(fb).SerializeToString(),
            headers={"Content-Type": "application/x-protobuf"},
        ).json()
        again = http.post("/optim_step", json=step).json()  # a retry: the same future
        assert again["request_id"] == optim["request_id"]
        done = poll(http, optim["request_id"])
        assert done["metrics"]["step:max"] == 1.0, done
        assert poll(http, first["request_id"], proto=True).startswith(b"")


def poll(http: httpx.Client, request_id: str, proto: bool = False):
    for _ in range(60):
        response = http.post("/retrieve_future", json={"request_id": request_id})
        if proto and "protobuf" in response.headers.get("content-type", ""):
            return response.content
        body = response.json()
        if body.get("type") != "try_again":
            return body
    raise AssertionError(f"request {request_id} never finished")


# -- sampling ------------------------------------------------------------------------------


def test_sampling_clients(server_env, alice, tiny_model):
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=4).result()
    client.forward_backward(datums(5), "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    synced = client.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=1)
    response = synced.sample(prompt, num_samples=3, sampling_params=params).result()
    assert len(response.sequences) == 3
    assert len({s.sequence_id for s in response.sequences}) == 3
    for seq in response.sequences:
        assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
        assert all(lp <= 0 for lp in seq.logprobs)

    # The sampler's logprobs of a sequence equal the trainer's (same weights, both fp32).
    sequence = [*prompt.to_ints(), *response.sequences[0].tokens]
    sampled = synced.compute_logprobs(types.ModelInput.from_ints(sequence)).result()
    assert sampled[0] is None
    trainer = client.forward(
        [
            types.Datum(
                model_input=types.ModelInput.from_ints(sequence[:-1]),
                loss_fn_inputs={
                    "target_tokens": sequence[1:],
                    "weights": [1.0] * (len(sequence) - 1),
                },
            )
        ],
        "cross_entropy",
    ).result()
    assert sampled[1:] == pytest.approx(trainer.loss_fn_outputs[0]["logprobs"].tolist(), abs=1e-3)

    saved = client.save_weights_for_sampler("for-sampling").result()
    from_path = alice.create_sampling_client(model_path=saved.path).result()
    assert from_path.get_base_model() == tiny_model
    greedy = types.SamplingParams(max_tokens=5, temperature=0.0)
    assert (
        from_path.sample(prompt, 1, greedy).result().sequences[0].tokens
        == synced.sample(prompt, 1, greedy).result().sequences[0].tokens
    )
    base = alice.create_sampling_client(base_model=tiny_model).result()
    with_prompt = base.sample(
        prompt, 1, greedy, include_prompt_logprobs=True, topk_prompt_logprobs=2
    ).result()
    assert with_prompt.prompt_logprobs[0] is None and len(with_prompt.prompt_logprobs) == 4
    assert len(with_prompt.topk_prompt_logprobs[1]) == 2


def test_backpressure_answers_429(server_env, tiny_model, tmp_path):
    """With a queue of one, a second sample request while the first runs gets 429."""
    config = ServerConfig(
        **{**server_env["config"].__dict__, "max_inflight_samples": 1, "home": str(tmp_path)}
    )
    keys = KeyStore(config.resolved_keys_file())
    key = keys.add("carol")
    running = start_in_thread(config, server_env["service"])
    try:
        with httpx.Client(
            base_url=running.url + "/api/v1", headers={"X-API-Key": key}, timeout=60
        ) as http:
            session = http.post(
                "/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "x"}
            ).json()["session_id"]
            sampler = http.post(
                "/create_sampling_session",
                json={
                    "session_id": session,
                    "sampling_session_seq_id": 0,
                    "base_model": tiny_model,
                },
            ).json()["sampling_session_id"]
            body = {
                "sampling_session_id": sampler,
                "seq_id": 0,
                "num_samples": 32,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                "sampling_params": {"max_tokens": 200, "stop": []},
            }
            first = http.post("/asample", json=body)
            second = http.post("/asample", json={**body, "seq_id": 1})
            assert first.status_code == 200 and second.status_code == 429, second.text
            poll(http, first.json()["request_id"], proto=True)
            assert (
                http.post("/asample", json={**body, "seq_id": 2, "num_samples": 1}).status_code
                == 200
            )
    finally:
        running.stop()


# -- tenancy and auth ----------------------------------------------------------------------


def test_tenants_cannot_see_each_other(server_env, alice, bob, tiny_model):
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=6).result()
    client.forward_backward(datums(1), "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=1e-2))
    state = client.save_state("mine").result()
    sampler = client.save_weights_for_sampler("mine").result()
    sampling = client.save_weights_and_get_sampling_client().result()
    sampler_id = sampling._sampling_session_id
    fb = client.forward(datums(1), "cross_entropy").result()
    del fb

    rest_bob = tinker.RestClient(base_url=server_env["url"], api_key=server_env["keys"]["bob"])
    assert client.model_id not in {
        r.training_run_id for r in rest_bob.list_training_runs(limit=100).result().training_runs
    }
    with pytest.raises(tinker.NotFoundError):
        rest_bob.get_training_run(client.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        rest_bob.list_checkpoints(client.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        rest_bob.delete_checkpoint_from_tinker_path(state.path).result()
    with pytest.raises(tinker.NotFoundError):
        rest_bob.get_weights_info_by_tinker_path(sampler.path).result()
    with pytest.raises(tinker.NotFoundError):
        rest_bob.get_sampler(sampler_id).result()
    with pytest.raises(Exception, match="not found"):
        bob.create_training_client_from_state_with_optimizer(state.path).result()
    with pytest.raises(Exception, match="not found"):
        bob.create_sampling_client(model_path=sampler.path).result()

    with raw(server_env, "bob") as http, raw(server_env, "alice") as own:
        sample = {
            "sampling_session_id": sampler_id,
            "seq_id": 5,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 2},
        }
        assert http.post("/asample", json=sample).status_code == 404
        mine = own.post("/asample", json=sample).json()["request_id"]
        assert http.post("/retrieve_future", json={"request_id": mine}).status_code == 404
        optim = {"adam_params": {"learning_rate": 0.1}, "model_id": client.model_id, "seq_id": 99}
        assert http.post("/optim_step", json=optim).status_code == 404
        assert http.post("/get_info", json={"model_id": client.model_id}).status_code == 404
        unknown = http.post("/get_info", json={"model_id": "nope:train:0"})
        assert unknown.status_code == 404
    # Alice's things are intact and still hers.
    assert rest_alice(server_env).list_checkpoints(client.model_id).result().checkpoints


def rest_alice(server_env):
    return tinker.RestClient(base_url=server_env["url"], api_key=server_env["keys"]["alice"])


def test_keys_are_required(server_env):
    with httpx.Client(base_url=server_env["url"] + "/api/v1", timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.post("/client/config", json={}).status_code == 401
        wrong = {"X-API-Key": "tml-not-a-key"}
        assert http.get("/training_runs", headers=wrong).status_code == 401
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(
            base_url=server_env["url"], api_key="tml-wrong"
        ).list_training_runs().result()


def test_key_store_commands(tmp_path, capsys):
    from rl.server.__main__ import main

    keys_file = str(tmp_path / "keys.json")
    assert main(["keys", "add", "dave", "--keys-file", keys_file]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("tml-")
    assert key not in (tmp_path / "keys.json").read_text()  # only a hash is stored
    store = KeyStore(keys_file)
    assert store.tenant_for(key) == "dave" and store.tenant_for(key + "x") is None
    main(["keys", "list", "--keys-file", keys_file])
    assert capsys.readouterr().out.split() == ["dave"]
    assert main(["keys", "revoke", "dave", "--keys-file", keys_file]) == 0
    assert store.tenant_for(key) is None


# -- bad input over HTTP: a clear error, nothing changed -------------------------------------


def test_bad_input_is_a_clear_user_error_and_changes_nothing(server_env, alice, tiny_model):
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=8).result()
    probe = datums(4)
    before = logprobs_of(client.forward(probe, "cross_entropy").result())

    def bad(tokens=None, **inputs):
        tokens = tokens or [1, 2, 3, 4]
        base = {"target_tokens": [2, 3, 4, 5], "weights": [1.0] * 4}
        return types.Datum(
            model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={**base, **inputs}
        )

    cases = [
        ([bad(target_tokens=[2, 3, 4])], "cross_entropy", "shape \\[3\\]"),
        ([bad(tokens=[1, 2, 10**7, 4])], "cross_entropy", "vocab"),
        ([bad(target_tokens=[2, 3, 4, 10**7])], "cross_entropy", "vocab"),
        ([bad(weights=[1.0, math.nan, 1.0, 1.0])], "cross_entropy", "finite"),
        ([bad()], "ppo", "logprobs"),
        ([bad(logprobs=[-1.0] * 4, advantages=[math.nan, 0, 0, 0])], "ppo", "finite"),
        ([bad()], "no_such_loss", "loss"),
    ]
    for data, loss, words in cases:
        with pytest.raises(tinker.RequestFailedError, match=f"(?i){words}") as info:
            client.forward_backward(data, loss).result()
        assert info.value.category == types.RequestErrorCategory.User
    with pytest.raises(tinker.RequestFailedError, match="no gradient"):
        client.optim_step(types.AdamParams(learning_rate=1.0)).result()
    for name in ("../escape", "a/b", ".hidden"):
        with pytest.raises(tinker.RequestFailedError, match="checkpoint name"):
            client.save_state(name).result()
    for path in (
        "/etc/passwd",
        "tinker://../../x/weights/y",
        f"tinker://{client.model_id}/weights/none",
    ):
        with pytest.raises(
            (tinker.BadRequestError, tinker.NotFoundError, tinker.RequestFailedError)
        ):
            alice.create_training_client_from_state(path).result()
    assert logprobs_of(client.forward(probe, "cross_entropy").result()) == before

    with raw(server_env) as http:
        garbage = http.post(
            "/forward_backward",
            content=b"\xff\x00garbage",
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert garbage.status_code == 400 and "protobuf" in garbage.json()["detail"]
        broken = http.post(
            "/optim_step", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 400 and "malformed" in broken.json()["detail"]
        missing = http.post("/optim_step", json={"model_id": client.model_id})
        assert missing.status_code == 400 and "optim_params" in missing.json()["detail"]
        huge = http.post(
            "/optim_step", content=b"x" * (2 * 2**20), headers={"Content-Type": "application/json"}
        )
        assert huge.status_code == 413
    assert logprobs_of(client.forward(probe, "cross_entropy").result()) == before
    # The client is not poisoned by the errors: training goes on.
    client.forward_backward(probe, "cross_entropy")
    assert (
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["step:max"] == 1.0
    )


# -- durability ----------------------------------------------------------------------------


def test_runs_and_checkpoints_survive_a_restart(server_env, tiny_model, tmp_path, monkeypatch):
    config = ServerConfig(**{**server_env["config"].__dict__, "home": str(tmp_path)})
    key = KeyStore(config.resolved_keys_file()).add("erin")
    first = start_in_thread(config, server_env["service"])
    try:
        client = tinker.ServiceClient(base_url=first.url, api_key=key)
        training = client.create_lora_training_client(
            tiny_model, rank=4, seed=1, user_metadata={"k": "v"}
        ).result()
        training.forward_backward(datums(1), "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2))
        path = training.save_state("kept").result().path
        expected = logprobs_of(training.forward(datums(2), "cross_entropy").result())
    finally:
        first.stop()
    second = start_in_thread(config, server_env["service"])  # a new server state, same disk
    try:
        rest = tinker.RestClient(base_url=second.url, api_key=key)
        run = rest.get_training_run(training.model_id).result()
        assert run.user_metadata == {"k": "v"} and run.last_checkpoint.tinker_path == path
        with httpx.Client(base_url=second.url + "/api/v1", headers={"X-API-Key": key}) as http:
            gone = http.post("/get_info", json={"model_id": training.model_id})
            assert gone.status_code == 404 and "not loaded" in gone.json()["detail"]
        client = tinker.ServiceClient(base_url=second.url, api_key=key)
        resumed = client.create_training_client_from_state_with_optimizer(path).result()
        assert logprobs_of(resumed.forward(datums(2), "cross_entropy").result()) == pytest.approx(
            expected, abs=1e-6
        )
    finally:
        second.stop()


def test_unsupported_endpoints_say_so(server_env):
    with raw(server_env) as http:
        for path in ("/copy_weights", "/save_weights_external"):
            response = http.post(path, json={})
            assert response.status_code == 400 and "not supported" in response.json()["detail"]
    with raw(server_env, who="") as anonymous:
        assert anonymous.post("/copy_weights", json={}).status_code == 401


def test_legacy_load_state_and_get_sampler(server_env, alice, tiny_model):
    """The deprecated in-place `load_state` (load_weights addressed by model_id + seq_id)."""
    source = alice.create_lora_training_client(tiny_model, rank=4, seed=12).result()
    source.forward_backward(datums(1), "cross_entropy")
    source.optim_step(types.AdamParams(learning_rate=1e-2))
    path = source.save_state("legacy").result().path
    target = alice.create_lora_training_client(tiny_model, rank=4, seed=13).result()
    probe = datums(2)
    assert logprobs_of(target.forward(probe, "cross_entropy").result()) != pytest.approx(
        logprobs_of(source.forward(probe, "cross_entropy").result()), abs=1e-6
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target.load_state(path).result()
    assert logprobs_of(target.forward(probe, "cross_entropy").result()) == pytest.approx(
        logprobs_of(source.forward(probe, "cross_entropy").result()), abs=1e-6
    )
    sampler = source.save_weights_and_get_sampling_client().result()
    record = rest_alice(server_env).get_sampler(sampler._sampling_session_id).result()
    assert record.base_model == tiny_model


def test_sampling_surface_through_the_sdk(server_env, alice, tiny_model):
    """SDK 0.38's sampling options on a trained adapter, each number equal to the trainer's
    own logprob of the same token at the same position (one batched `forward`)."""
    import torch

    client = alice.create_lora_training_client(tiny_model, rank=4, seed=9).result()
    client.forward_backward(datums(9), "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = client.save_weights_and_get_sampling_client().result()
    prompt_ids = [1, 504, 3458, 314, 4649, 314]
    prompt = types.ModelInput.from_ints(prompt_ids)

    def trainer_logprobs(queries: list[tuple[list[int], int]]) -> list[float]:
        """The trainer's logprob of `token` right after `prefix`, per query."""
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(prefix),
                loss_fn_inputs={
                    "target_tokens": [*prefix[1:], token],
                    "weights": [0.0] * (len(prefix) - 1) + [1.0],
                },
            )
            for prefix, token in queries
        ]
        out = client.forward(data, "cross_entropy").result().loss_fn_outputs
        return [float(o["logprobs"].tolist()[-1]) for o in out]

    params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=2)
    response = sampler.sample(prompt, 2, params, topk_sample_logprobs=3).result()
    queries, reported = [], []
    for sequence in response.sequences:
        assert len(sequence.topk_logprobs) == len(sequence.tokens)
        full = prompt_ids + sequence.tokens
        for j, top in enumerate(sequence.topk_logprobs):
            assert len(top) == 3
            queries += [(full[: len(prompt_ids) + j], token) for token, _ in top]
            reported += [logprob for _, logprob in top]
    assert reported == pytest.approx(trainer_logprobs(queries), abs=1e-3)

    # target_prompt_logprobs, sparse as the cookbook's decisions recipe sends it, and dense.
    ids = torch.full((len(prompt_ids) - 1, 2), -1, dtype=torch.int64)
    ids[3] = torch.tensor([7, 11])
    ids[1, 0] = prompt_ids[2]
    for targets in (types.TensorData.from_torch_sparse(ids, pad_value=-1),
                    types.TensorData.from_torch(ids)):  # fmt: skip
        got = sampler.sample(prompt, 1, params, target_prompt_logprobs=targets).result()
        values = got.target_prompt_logprobs.to_torch()
        assert list(values.shape) == [len(prompt_ids) - 1, 2]
        assert (got.target_prompt_logprobs.sparse_crow_indices is None) == (
            targets.sparse_crow_indices is None
        )
        cells = [(int(r), int(c)) for r, c in (ids >= 0).nonzero()]
        expected = trainer_logprobs([(prompt_ids[: r + 1], int(ids[r, c])) for r, c in cells])
        assert [values[r, c].item() for r, c in cells] == pytest.approx(expected, abs=1e-3)
        assert values[ids < 0].abs().max().item() == 0.0

    alt = sampler.sample(prompt, 1, params, prompt_alt_tokens_k=3).result().prompt_alt_tokens
    tokens, logprobs = alt.tokens.to_torch(), alt.logprobs.to_torch()
    assert list(tokens.shape) == list(logprobs.shape) == [len(prompt_ids) - 1, 3]
    queries = [(prompt_ids[: i + 1], int(t)) for i in range(len(prompt_ids) - 1) for t in tokens[i]]
    assert logprobs.reshape(-1).tolist() == pytest.approx(trainer_logprobs(queries), abs=1e-3)

    last = sampler.sample(
        prompt, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=2
    ).result()
    assert last.prompt_logprobs[:-2] == [None] * (len(prompt_ids) - 2)
    expected = trainer_logprobs([(prompt_ids[:i], prompt_ids[i]) for i in (4, 5)])
    assert last.prompt_logprobs[-2:] == pytest.approx(expected, abs=1e-3)

    with pytest.raises(tinker.RequestFailedError, match="prompt_logprobs_last_n=6"):
        sampler.sample(
            prompt, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=6
        ).result()
