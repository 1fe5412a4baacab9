"""Supervised fine-tuning through the client API, in one file.

Trains a LoRA adapter on SmolLM2-135M-Instruct with a small chat dataset shipped in the repo,
training only on the assistant turns, and prints the per-token loss of each step:

    python examples/sl_basic.py                      # defaults below
    python examples/sl_basic.py steps=40 learning_rate=1e-4
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import rl
from envs.chat import ChatRenderer
from rl import types
from rl.cli import doc, parse_config
from trainers import TrainerConfig

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Config:
    base_model: str = doc("SmolLM2-135M-Instruct", "built-in name, local HF directory or hub name")
    data: str = doc(str(HERE / "data" / "chat_sft.jsonl"), "chat JSONL: {'messages': [...]}")
    rank: int = doc(32, "LoRA rank")
    learning_rate: float = doc(2e-4, "AdamW learning rate")
    batch_size: int = doc(8, "conversations per step")
    steps: int = doc(20, "optimizer steps")
    max_length: int = doc(384, "conversations are cut to this many tokens")
    seed: int = doc(0, "seed for the adapter init and the data order")
    dtype: str = doc("auto", "base-weight dtype: auto (bfloat16), bfloat16 or float32")


def load_datums(config: Config, renderer: ChatRenderer) -> list[types.Datum]:
    datums = []
    for line in Path(config.data).read_text().splitlines():
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        tokens, weights = renderer.render_supervised(messages)
        tokens, weights = tokens[: config.max_length + 1], weights[: config.max_length + 1]
        if sum(weights[1:]) == 0:
            continue
        # Position i of the input predicts token i + 1.
        datums.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
            )
        )
    return datums


def main(config: Config, service: rl.ServiceClient | None = None) -> list[float]:
    """Runs the fine-tune; returns the mean per-token loss of each step."""
    own_service = service is None
    service = service or rl.ServiceClient(trainer_config=TrainerConfig(dtype=config.dtype))  # type: ignore[arg-type]
    client = service.create_lora_training_client(
        config.base_model, rank=config.rank, seed=config.seed
    )
    renderer = ChatRenderer(client.get_tokenizer())
    datums = load_datums(config, renderer)
    rng = random.Random(config.seed)
    print(f"{len(datums)} conversations from {config.data}; base model {config.base_model}")

    losses = []
    order: list[types.Datum] = []
    for step in range(config.steps):
        if len(order) < config.batch_size:
            order += rng.sample(datums, len(datums))
        batch, order = order[: config.batch_size], order[config.batch_size :]
        start = time.perf_counter()
        # Submit both before waiting: they run back to back on the trainer.
        fwd_bwd = client.forward_backward(batch, "cross_entropy")
        optim = client.optim_step(types.AdamParams(learning_rate=config.learning_rate))
        metrics = fwd_bwd.result().metrics
        optim.result()
        seconds = time.perf_counter() - start
        loss = metrics["loss:sum"] / metrics["weights:sum"]
        losses.append(loss)
        tokens = sum(d.model_input.length for d in batch)
        print(f"step {step:3d}  loss {loss:.4f}  {tokens / seconds:7.1f} tok/s", flush=True)

    print(f"loss: first step {losses[0]:.4f} -> last step {losses[-1]:.4f}")
    if own_service:
        service.close()
    return losses


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
