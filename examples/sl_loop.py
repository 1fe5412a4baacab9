"""Supervised fine-tuning in one file, on the client API alone.

Trains a LoRA adapter on SmolLM2-135M-Instruct with a small chat dataset shipped in the repo,
training only on the assistant turns, and prints the per-token loss of each step:

    python examples/sl_loop.py                                  # in-process (an embedded Ray)
    python examples/sl_loop.py steps=40 learning_rate=1e-4
    python examples/sl_loop.py base_url=http://127.0.0.1:8000   # against `python -m rl.server`
                                                                # (TINKER_API_KEY in the env)

Each step: `batch_size` conversations, shuffled anew each pass over the data; one datum each,
whose weights are 1 on the assistant's tokens and 0 elsewhere; forward_backward with
`cross_entropy` (the summed -logprob of the weighted tokens) and optim_step, queued back to back.
rl.loop.sft is the same loop with evals, schedules, checkpoints and resume.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rl
from envs.chat import ChatRenderer
from rl.cli import parse_config

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Config:
    base_model: str = "SmolLM2-135M-Instruct"
    """built-in name, local HF directory or hub name"""
    data: str = str(HERE / "data" / "chat_sft.jsonl")
    """chat JSONL: {'messages': [...]}"""
    rank: int = 32
    """LoRA rank"""
    learning_rate: float = 2e-4
    """AdamW learning rate"""
    batch_size: int = 8
    """conversations per step"""
    steps: int = 20
    """optimizer steps"""
    max_length: int = 384
    """conversations are cut to this many tokens"""
    seed: int = 0
    """seed for the adapter init and the data order"""
    base_url: str = ""
    """'' = in-process; else the URL of an engineroom (Tinker) server, with the tinker SDK"""


def load_datums(tinker: Any, config: Config, renderer: ChatRenderer) -> list[Any]:
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
            tinker.types.Datum(
                model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
            )
        )
    return datums


def ready(client: Any) -> Any:
    """The SDK hands out futures of clients (`.result()` gives the client); engineroom's
    in-process service hands out the clients themselves."""
    return client.result() if hasattr(client, "result") else client


def connect(config: Config) -> tuple[Any, Any]:
    """(the client module, a ServiceClient): engineroom in-process, or the SDK to a server."""
    if not config.base_url:
        return rl, rl.ServiceClient()
    import tinker  # the official SDK; TINKER_API_KEY names the tenant

    return tinker, tinker.ServiceClient(base_url=config.base_url)


def main(argv: Sequence[str], service: Any = None) -> list[float]:
    """Runs the fine-tune; returns the mean per-token loss of each step."""
    config = parse_config(Config, argv)
    tinker, own = (rl, None) if service is not None else connect(config)
    service = service or own
    client = ready(
        service.create_lora_training_client(config.base_model, rank=config.rank, seed=config.seed)
    )
    datums = load_datums(tinker, config, ChatRenderer(client.get_tokenizer()))
    rng = random.Random(config.seed)
    print(f"{len(datums)} conversations from {config.data}; base model {config.base_model}")
    losses = []
    order: list[Any] = []
    try:
        for step in range(config.steps):
            if len(order) < config.batch_size:
                order += rng.sample(datums, len(datums))
            batch, order = order[: config.batch_size], order[config.batch_size :]
            start = time.perf_counter()
            # Submit both before waiting: they run back to back on the trainer.
            fwd_bwd = client.forward_backward(batch, "cross_entropy")
            optim = client.optim_step(tinker.types.AdamParams(learning_rate=config.learning_rate))
            metrics = fwd_bwd.result().metrics
            optim.result()
            seconds = time.perf_counter() - start
            loss = metrics["loss:sum"] / sum(
                sum(d.loss_fn_inputs["weights"].tolist()) for d in batch
            )
            losses.append(loss)
            tokens = sum(d.model_input.length for d in batch)
            print(f"step {step:3d}  loss {loss:.4f}  {tokens / seconds:7.1f} tok/s", flush=True)
    finally:
        if own is not None:
            # engineroom's stops its embedded Ray; the SDK's ends its session on the server.
            if tinker is rl:
                own.close()
            else:
                own.close("success").result()
    print(f"loss: first step {losses[0]:.4f} -> last step {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main(sys.argv[1:])
