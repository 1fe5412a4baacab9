"""Resources: the documented workflows fit a 2-CPU Ray with the default reservations, and an
actor that cannot be placed ends the call with a clear error instead of a silent wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from ray.util.placement_group import placement_group_table

from rl.placement import ResourcesUnavailableError
from samplers.config import SamplerConfig
from trainers import TrainerConfig

# Runs in a fresh process, so that its embedded Ray is exactly what a user gets on this
# machine (2 CPUs), with nothing of the test session's fixtures in it.
WORKFLOW = textwrap.dedent(
    """
    import json, sys
    import ray
    import rl
    from rl import types
    from samplers.config import SamplerConfig
    from trainers import TrainerConfig

    model, checkpoints = sys.argv[1], sys.argv[2]
    service = rl.ServiceClient(
        num_cpus=2,
        trainer_config=TrainerConfig(dtype="float32", checkpoint_dir=checkpoints),
        sampler_config=SamplerConfig(engine="torch", max_model_len=128),
    )
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=0)
    prompt = types.ModelInput.from_ints([1, 504, 3458, 314])
    clients = []
    for seed in (0, 1):
        training = service.create_lora_training_client(model, rank=4, seed=seed)
        clients.append(training.save_weights_and_get_sampling_client())
    clients.append(service.create_sampling_client(base_model=model))
    lengths = [len(c.sample(prompt, 2, params).result().sequences) for c in clients]
    modes = [c.weights.kind for c in clients]
    free = ray.available_resources().get("CPU", 0.0)
    service.close()
    print("RESULT " + json.dumps({"lengths": lengths, "modes": modes, "free_cpus": free}))
    """
)


def test_two_training_clients_and_a_base_sampler_fit_two_cpus(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", WORKFLOW, tiny_model, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["lengths"] == [2, 2, 2]
    assert result["modes"] == ["merged", "merged", "base"]  # one pool per merged client
    # Trainer 1 + three pools of one actor at 0.25: a quarter CPU is still free.
    assert result["free_cpus"] == pytest.approx(0.25)


def _pending_groups() -> int:
    return sum(1 for g in placement_group_table().values() if g["state"] == "PENDING")


def test_a_trainer_that_cannot_be_placed_is_a_clear_error(ray_local, tiny_model, tmp_path):
    from rl import ServiceClient

    service = ServiceClient(
        trainer_config=TrainerConfig(
            num_cpus=64, schedule_timeout_s=1.0, checkpoint_dir=str(tmp_path)
        )
    )
    try:
        with pytest.raises(ResourcesUnavailableError) as error:
            service.create_lora_training_client(tiny_model, rank=4)
        message = str(error.value)
        assert "trainer actor" in message and "{'CPU': 64.0}" in message
        assert "{'CPU': 2.0}" in message  # what the cluster has
        assert "schedule_timeout_s" in message
        assert service.hosts == {} and _pending_groups() == 0  # nothing left behind
    finally:
        service.close()


def test_a_sampler_that_cannot_be_placed_is_a_clear_error(ray_local, tiny_model, tmp_path):
    from rl import ServiceClient

    service = ServiceClient(
        trainer_config=TrainerConfig(checkpoint_dir=str(tmp_path)),
        sampler_config=SamplerConfig(engine="torch", num_cpus_per_actor=64, schedule_timeout_s=1),
    )
    try:
        with pytest.raises(ResourcesUnavailableError, match=r"sampler actor 0 of pool .*64\.0"):
            service.create_sampling_client(base_model=tiny_model)
        assert service.pools.started() == {} and _pending_groups() == 0
    finally:
        service.close()


def test_resource_settings_are_checked():
    with pytest.raises(ValueError, match="schedule_timeout_s"):
        SamplerConfig(schedule_timeout_s=0)
    with pytest.raises(ValueError, match="schedule_timeout_s"):
        TrainerConfig(schedule_timeout_s=-1)
    with pytest.raises(ValueError, match="num_cpus"):
        TrainerConfig(num_cpus=-0.5)
