"""The trainer actor dies (killed); the service restarts it and restores every training
client it hosted: one that changed nothing since its last save goes on as if nothing
happened, one that did raises TrainerRestartedError once, then works from its save."""

from __future__ import annotations

import time

import pytest
import ray

from rl.errors import TrainerOutOfMemoryError, TrainerRestartedError
from rl.types import AdamParams, Datum, ModelInput
from samplers.config import SamplerConfig
from trainers import TrainerConfig

SEQUENCE = [1, 504, 3458, 314, 4649, 314, 253, 5, 6, 7, 8, 9]
DATUM = Datum(
    model_input=ModelInput.from_ints(SEQUENCE[:-1]),
    loss_fn_inputs={"target_tokens": SEQUENCE[1:], "weights": [1.0] * (len(SEQUENCE) - 1)},
)


@pytest.fixture
def service(ray_local, tmp_path):
    from rl import ServiceClient

    client = ServiceClient(
        trainer_config=TrainerConfig(
            dtype="float32", num_threads=1, num_cpus=0.1, checkpoint_dir=str(tmp_path)
        ),
        sampler_config=SamplerConfig(engine="torch", num_cpus_per_actor=0.05, max_model_len=128),
    )
    yield client
    client.close()


def step(client) -> float:
    client.forward_backward([DATUM], "cross_entropy")
    return client.optim_step(AdamParams(learning_rate=3e-2)).result().metrics["step:max"]


def logprobs(client) -> list[float]:
    output = client.forward([DATUM], "cross_entropy").result()
    return [float(x) for x in output.loss_fn_outputs[0]["logprobs"].tolist()]


def test_clients_survive_a_trainer_death(service, tiny_model):
    saved = service.create_lora_training_client(tiny_model, rank=4, seed=1)
    step(saved)
    saved.save_state("one").result()
    saved_logprobs = logprobs(saved)

    unsaved = service.create_lora_training_client(tiny_model, rank=4, seed=2)
    initial_logprobs = logprobs(unsaved)
    step(unsaved)
    step(unsaved)

    old_actor = saved.trainer_actor
    ray.kill(old_actor)  # as a SIGKILL or an out-of-memory kill would
    began = time.perf_counter()
    # Nothing changed since its save: the call goes on, on the restored state.
    assert logprobs(saved) == pytest.approx(saved_logprobs, abs=1e-6)
    print(f"restart + restore: {time.perf_counter() - began:.1f}s")
    assert saved.trainer_actor is not old_actor and unsaved.trainer_actor is saved.trainer_actor

    # Two steps since its restore point (its initial adapter) are lost: one clear error...
    with pytest.raises(TrainerRestartedError) as error:
        logprobs(unsaved)
    assert error.value.model_id == unsaved.model_id and error.value.step == 0
    assert error.value.lost == ["forward_backward", "optim_step"] * 2
    assert unsaved.model_id in str(error.value) and "step 0" in str(error.value)
    # ...then it works from there: the same initial adapter (its seed was kept).
    assert logprobs(unsaved) == pytest.approx(initial_logprobs, abs=1e-6)

    # Training goes on from the saved step (Adam state and step count restored).
    assert step(saved) == 2.0
    assert step(unsaved) == 1.0


def test_calls_queued_before_a_lost_restart_all_raise(service, tiny_model):
    """A pipelined forward_backward + optim_step must not step on half a gradient."""
    client = service.create_lora_training_client(tiny_model, rank=4, seed=3)
    step(client)  # changes state; nothing saved
    ray.kill(client.trainer_actor)
    backward = client.forward_backward([DATUM], "cross_entropy")
    optim = client.optim_step(AdamParams(learning_rate=3e-2))
    with pytest.raises(TrainerRestartedError):
        backward.result()
    with pytest.raises(TrainerRestartedError):
        optim.result()
    assert step(client) == 1.0  # submitted after the error: runs on the restored state


def test_sync_after_a_trainer_death(service, tiny_model):
    client = service.create_lora_training_client(tiny_model, rank=4, seed=4)
    step(client)
    client.save_state("saved").result()
    ray.kill(client.trainer_actor)
    sampler = client.save_weights_and_get_sampling_client()
    lps = sampler.compute_logprobs(ModelInput.from_ints(SEQUENCE)).result()[1:]
    assert [float(x) for x in lps] == pytest.approx(logprobs(client), abs=1e-4)


# What Ray's memory monitor reports when it ends a worker: a page of its own, never to reach
# a user as an error message.
RAY_OOM_REPORT = (
    "Task was killed due to the node running low on memory.\nMemory on the node (IP: "
    "127.0.0.1, ID: ab12) where the task (actor ID: cd34, name=LoraTrainer.__init__, pid=1) was "
    "running was 22.83GB / 24.00GB (0.951), which exceeds the memory usage threshold of 0.95.\n"
    + "\n".join(f"PID\tMEM(GB)\tCOMMAND\n{i}\t1.2\tray::SamplerActor" for i in range(40))
)


def test_an_out_of_memory_death_is_one_short_error_and_the_trainer_serves_on(service, tiny_model):
    """A call that meets Ray's out-of-memory kill: the caller gets one short line naming the
    trainer, the batch and the limit; the trainer is restarted, and the next call runs."""
    client = service.create_lora_training_client(tiny_model, rank=4, seed=3)
    before = logprobs(client)
    host = service.hosts[tiny_model]
    generation = host.generation

    def killed(actor):
        raise ray.exceptions.OutOfMemoryError(RAY_OOM_REPORT)

    with pytest.raises(TrainerOutOfMemoryError) as error:
        client._guarded("forward_backward", killed, ([DATUM, DATUM], "cross_entropy")).result()
    message = str(error.value)
    assert "\n" not in message and "PID" not in message and len(message) < 400
    assert repr(tiny_model) in message and "2 datums (22 tokens)" in message
    assert "GiB" in message
    assert host.generation == generation + 1  # restarted
    assert logprobs(client) == pytest.approx(before)  # nothing lost: its state was its initial
    assert step(client) == 1.0
