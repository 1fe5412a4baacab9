"""The real built-in model: converted from the packaged GGUF, loaded by the trainer."""

from __future__ import annotations

import pytest
import torch

from rl import types

pytestmark = pytest.mark.slow


def test_trainer_on_smollm2_knows_paris(service):
    client = service.create_lora_training_client("SmolLM2-135M-Instruct", rank=8, seed=0)
    tokenizer = client.get_tokenizer()
    prompt = tokenizer.encode("The capital of France is")
    answers = {word: tokenizer.encode(word)[0] for word in (" Paris", " London", " banana")}
    scores = {}
    for word, token in answers.items():
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(prompt),
            loss_fn_inputs={
                "target_tokens": [*prompt[1:], token],
                "weights": [0.0] * (len(prompt) - 1) + [1.0],
            },
        )
        out = client.forward([datum]).result()
        scores[word] = out.loss_fn_outputs[0]["logprobs"].to_torch()[-1].item()
    assert scores[" Paris"] > scores[" London"] > scores[" banana"]
    assert torch.tensor(scores[" Paris"]).exp() > 0.3
    info = client.get_info()
    assert info.model_data.vocab_size == 49152 and info.model_data.max_context_length == 8192
