"""Run with .venv-cookbook's python against a server (TINKER_BASE_URL, TINKER_API_KEY):
datums built as tinker-cookbook 0.6.1's `recipes/rl_loop.py` builds them (prompt targets
padded with 0, provenance spans from the recipe's own `with_sampled_provenance`), trained at
`stable_reinforce`, `gspo` and `importance_sampling`. The recipe itself loads gsm8k from the
hub; this is its datum construction on fixed prompts. Prints one JSON line per loss.

    python tests/cookbook_rl_loop.py MODEL
"""

import json
import math
import sys

import tinker
import torch
from tinker import types
from tinker.types.tensor_data import TensorData
from tinker_cookbook.recipes.rl_loop import with_sampled_provenance


def rl_loop_datums(prompt, sequences, advantages, loss_fn):
    """The body of rl_loop.py's datum loop, for one group."""
    datums = []
    for sequence, advantage in zip(sequences, advantages, strict=True):
        sampled_tokens, logprobs = sequence.tokens, sequence.logprobs
        ob_len = prompt.length - 1
        model_input = prompt.append(types.EncodedTextChunk(tokens=sampled_tokens[:-1]))
        target_tokens = [0] * ob_len + sampled_tokens
        padded_logprobs = [0.0] * ob_len + logprobs
        padded_advantages = [0.0] * ob_len + [advantage] * (model_input.length - ob_len)
        loss_fn_inputs = {
            "target_tokens": TensorData.from_torch(torch.tensor(target_tokens)),
            "logprobs": TensorData.from_torch(torch.tensor(padded_logprobs)),
            "advantages": TensorData.from_torch(torch.tensor(padded_advantages)),
        }
        if loss_fn == "gspo":
            ratio_mask = [0.0] * ob_len + [1.0] * len(sampled_tokens)
            loss_fn_inputs["sequence_ratio_mask"] = TensorData.from_torch(torch.tensor(ratio_mask))
        datum = types.Datum(model_input=model_input, loss_fn_inputs=loss_fn_inputs)
        if loss_fn == "stable_reinforce":
            datum = with_sampled_provenance(
                datum, prompt.length, len(sampled_tokens), sequence.sequence_id
            )
        datums.append(datum)
    return datums


def main(model: str) -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=model, rank=4)
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    prompt = types.ModelInput.from_ints([1, 504, 3458, 314, 4649, 314, 253])
    for loss_fn in ("stable_reinforce", "gspo", "importance_sampling"):
        sampler = training.save_weights_and_get_sampling_client(
            record_stability_info=loss_fn == "stable_reinforce"
        )
        sequences = sampler.sample(prompt, 4, params).result().sequences
        rewards = [float(len(s.tokens) % 2) + 0.1 * i for i, s in enumerate(sequences)]
        mean = sum(rewards) / len(rewards)
        datums = rl_loop_datums(prompt, sequences, [r - mean for r in rewards], loss_fn)
        output = training.forward_backward(datums, loss_fn=loss_fn).result()
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        loss = output.metrics.get("loss:sum", float("nan"))
        print(
            json.dumps(
                {
                    "loss_fn": loss_fn,
                    "loss": loss,
                    "finite": math.isfinite(loss),
                    "datums": len(datums),
                    "metrics": sorted(output.metrics),
                }
            )
        )


if __name__ == "__main__":
    main(sys.argv[1])
