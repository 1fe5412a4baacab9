"""A sampling client samples the weights it was made from for as long as it lives, in both
sync modes: train, sync, train, sync, and the first client still answers with the first
weights (its logprobs, and its greedy samples)."""

from __future__ import annotations

import pytest

from rl.types import AdamParams, Datum, ModelInput, SamplingParams
from samplers.config import SamplerConfig
from trainers import TrainerConfig

SEQUENCE = [1, 504, 3458, 314, 4649, 314, 253, 5, 6, 7, 8, 9]
PROMPT = ModelInput.from_ints(SEQUENCE[:5])
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, stop=[])


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from rl import ServiceClient

    client = ServiceClient(
        trainer_config=TrainerConfig(
            dtype="float32",
            num_threads=1,
            num_cpus=0.1,  # slivers: the session's Ray has 2 CPUs (conftest.py)
            checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")),
        ),
        sampler_config=SamplerConfig(
            engine="torch",
            dtype="float32",
            num_actors=2,
            num_cpus_per_actor=0.05,
            max_model_len=128,
            max_lora_rank=8,
        ),
    )
    yield client
    client.close()


DATUM = Datum(
    model_input=ModelInput.from_ints(SEQUENCE[:-1]),
    loss_fn_inputs={"target_tokens": SEQUENCE[1:], "weights": [1.0] * (len(SEQUENCE) - 1)},
)


def train(training_client, steps: int = 2) -> None:
    for _ in range(steps):
        training_client.forward_backward([DATUM], "cross_entropy")
        training_client.optim_step(AdamParams(learning_rate=3e-2)).result()


def trainer_logprobs(training_client) -> list[float]:
    output = training_client.forward([DATUM], "cross_entropy").result()
    return [float(x) for x in output.loss_fn_outputs[0]["logprobs"].tolist()]


def logprobs(client) -> list[float]:
    return [float(x) for x in client.compute_logprobs(ModelInput.from_ints(SEQUENCE)).result()[1:]]


def greedy(client) -> list[list[int]]:
    return [s.tokens for s in client.sample(PROMPT, 2, GREEDY).result().sequences]


@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_an_old_sampling_client_keeps_its_weights(service, tiny_model, mode):
    training_client = service.create_lora_training_client(tiny_model, rank=8, seed=7)
    train(training_client)
    first = training_client.save_weights_and_get_sampling_client(sync_mode=mode)
    first_weights = trainer_logprobs(training_client)  # the trainer's, at the first sync
    first_logprobs, first_samples = logprobs(first), greedy(first)
    assert first_logprobs == pytest.approx(first_weights, abs=1e-4)
    train(training_client)
    second = training_client.save_weights_and_get_sampling_client(sync_mode=mode)
    train(training_client)
    third = training_client.save_weights_and_get_sampling_client(sync_mode=mode)

    # Training moved the weights: the newer clients answer differently...
    assert max(abs(a - b) for a, b in zip(logprobs(third), first_logprobs, strict=True)) > 1e-2
    # ...and the first client still answers with the first weights, each time asked.
    for _ in range(2):
        assert logprobs(first) == pytest.approx(first_weights, abs=1e-4)
        assert greedy(first) == first_samples
    # The second, in between, keeps its own too; the newest has the trainer's current ones.
    assert logprobs(second) != pytest.approx(logprobs(third), abs=1e-3)
    assert logprobs(third) == pytest.approx(trainer_logprobs(training_client), abs=1e-4)
    if mode == "merged":  # the merged pool holds the third; the first is on the LoRA pool
        assert first.backup is not None and first.backup.weights is not None
        assert third.backup is not None and third.backup.weights is None
