"""Sessions that end give their models back: a session whose client walked away (its process
killed, no close) is ended after `session_timeout_s` without heartbeats; `close()` and
`unload_model` release at once. Released models leave the trainer and the samplers; their runs
and checkpoints stay, and a later call says what happened and how to resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import tinker
from tinker import types

from rl.server import ServerConfig, build_service, start_in_thread
from rl.server.keys import KeyStore
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 12.0  # the SDK beats every 10 s: a live session must outlast a gap of 10 s
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    config = ServerConfig(
        port=0,
        home=str(tmp_path_factory.mktemp("lifecycle")),
        models=tiny_model,
        session_timeout_s=TIMEOUT_S,
        long_poll_s=2.0,
        sampler=SamplerConfig(engine="torch", sync_mode="adapter", num_threads=1),
        trainer=TrainerConfig(dtype="float32", num_threads=1, num_cpus=0.1),
    )
    keys = KeyStore(config.resolved_keys_file())
    env = {"alice": keys.add("alice"), "bob": keys.add("bob")}
    service = build_service(config)
    running = start_in_thread(config, service)
    yield {"url": running.url, "keys": env, "service": service, "state": running.state}
    running.stop()
    service.close()


DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
    loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6], "weights": [1.0] * 5},
)

# A tenant's script that trains, saves, samples a checkpoint, then dies without a word.
WALK_AWAY = """
import json, os, sys, tinker
from tinker import types
service = tinker.ServiceClient()
client = service.create_lora_training_client({model!r}, rank=8, seed=1).result()
datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
    loss_fn_inputs={{"target_tokens": [2, 3, 4, 5, 6], "weights": [1.0] * 5}})
client.forward_backward([datum], "cross_entropy").result()
client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
state = client.save_state("walked").result().path
sampler_path = client.save_weights_for_sampler("walked").result().path
sampler = service.create_sampling_client(model_path=sampler_path)
sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1,
    types.SamplingParams(max_tokens=2)).result()
print(json.dumps({{"model_id": client.model_id, "state": state, "sampler": sampler_path}}),
    flush=True)
os._exit(0)  # no close(): the heartbeats just stop
"""


def trainer_adapters(server) -> list[str]:
    (host,) = server["service"].hosts.values()
    return ray.get(host.handle.adapter_ids.remote())


def lora_adapters(server) -> list[str]:
    """The model ids (training clients or checkpoint paths) of the adapters the samplers hold."""
    held = []
    for key, pool in server["service"].pools.started().items():
        if key.endswith("::lora"):
            for handle in pool.actor_handles():
                held += [m for m, _, _ in ray.get(handle.held.remote())["adapters"].values()]
    return held


def test_a_session_that_walks_away_is_ended_and_its_memory_released(server, tiny_model):
    env = {
        **os.environ,
        "TINKER_BASE_URL": server["url"],
        "TINKER_API_KEY": server["keys"]["alice"],
        "TINKER_TELEMETRY": "0",
    }
    done = subprocess.run(
        [sys.executable, "-c", WALK_AWAY.format(model=tiny_model)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    walked = json.loads(done.stdout.strip().splitlines()[-1])
    model_id = walked["model_id"]
    assert model_id in trainer_adapters(server)
    assert any(m.startswith("/") and "walked" in m for m in lora_adapters(server))

    def released() -> bool:
        held = lora_adapters(server)
        return model_id not in trainer_adapters(server) and not any("walked" in m for m in held)

    deadline = time.monotonic() + TIMEOUT_S * 3
    while not released() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert released()

    alice = tinker.ServiceClient(base_url=server["url"], api_key=server["keys"]["alice"])
    with httpx.Client(
        base_url=server["url"] + "/api/v1", headers={"X-API-Key": server["keys"]["alice"]}
    ) as http:
        answer = http.post("/get_info", json={"model_id": model_id, "type": "get_info"})
    assert answer.status_code == 404
    message = answer.json()["detail"]
    assert "released" in message and f"no heartbeat for {TIMEOUT_S:g} s" in message
    assert walked["state"] in message  # the checkpoint to resume from
    # The run and its checkpoints stay: listed, and the state resumes.
    runs = alice.create_rest_client().list_training_runs().result()
    assert model_id in [r.training_run_id for r in runs.training_runs]
    resumed = alice.create_training_client_from_state_with_optimizer(walked["state"]).result()
    assert resumed.forward([DATUM], "cross_entropy").result().loss_fn_outputs
    alice.close("success").result()


def test_close_and_unload_release_at_once(server, tiny_model):
    bob = tinker.ServiceClient(base_url=server["url"], api_key=server["keys"]["bob"])
    first = bob.create_lora_training_client(tiny_model, rank=8, seed=2).result()
    second = bob.create_lora_training_client(tiny_model, rank=8, seed=3).result()
    assert {first.model_id, second.model_id} <= set(trainer_adapters(server))
    headers = {"X-API-Key": server["keys"]["alice"]}
    with httpx.Client(base_url=server["url"] + "/api/v1", headers=headers) as alice:
        answer = alice.post("/unload_model", json={"model_id": first.model_id})
    assert answer.status_code == 404  # another tenant's model: not found, as everywhere
    headers = {"X-API-Key": server["keys"]["bob"]}
    with httpx.Client(base_url=server["url"] + "/api/v1", headers=headers) as http:
        answer = http.post("/unload_model", json={"model_id": first.model_id})
        assert answer.status_code == 200 and answer.json()["model_id"] == first.model_id
        assert first.model_id not in trainer_adapters(server)
        assert http.post("/unload_model", json={"model_id": first.model_id}).status_code == 404
    with pytest.raises(tinker.NotFoundError, match="unload_model"):
        first.forward([DATUM], "cross_entropy").result()
    bob.close("success").result()  # answered at once; the release follows in the background
    deadline = time.monotonic() + 60
    while second.model_id in trainer_adapters(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert second.model_id not in trainer_adapters(server)
