"""The RL algorithm in one file, synchronous, on the client API alone.

    python examples/rl_loop.py                                   # in-process (an embedded Ray)
    python examples/rl_loop.py num_steps=10 learning_rate=5e-4
    python examples/rl_loop.py base_url=http://127.0.0.1:8000    # against `python -m rl.server`
                                                                 # (TINKER_API_KEY in the env)

The task: "What is a + b?" (operands up to 10), answered as the equation with its result
("3 + 7 = 10"). The reward weighs that form as much as the answer: 1 for a right equation, 0 for
a wrong one or a right number in another form, -1 for neither. Each step:

    1. push the current weights to the samplers          save_weights_and_get_sampling_client
    2. sample `group_size` replies to each of `groups_per_batch` problems          sample
    3. advantage of a reply = its reward - the mean reward of its group; groups whose replies
       all scored the same teach nothing and are dropped
    4. one datum per reply: prompt tokens weigh 0, sampled tokens weigh 1 and carry the
       sampler's logprobs and the advantage (divided by the tokens sampled in the batch, so
       the summed loss is a mean per token, as DAPO and TRL's `dapo`)
    5. forward_backward with the clipped `ppo` loss, then optim_step

It is rl.loop.train's algorithm without the pipeline, the env library, checkpoints or logging.
With `base_url`, the same code runs on the official `tinker` SDK against engineroom's server.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import rl
from rl.cli import parse_config

SYSTEM = "You are a calculator. Reply with only the equation and its result, like 2 + 2 = 4."
EQUATION = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)\s*=\s*(-?\d+)")


@dataclass(frozen=True)
class Config:
    base_model: str = "SmolLM2-135M-Instruct"
    """built-in name or local HF directory (the server must serve it too)"""
    base_url: str = ""
    """'' = in-process; else the URL of an engineroom (Tinker) server, with the tinker SDK"""
    num_steps: int = 10
    """optimizer steps"""
    groups_per_batch: int = 12
    """problems per step"""
    group_size: int = 8
    """replies per problem"""
    max_tokens: int = 16
    """tokens sampled per reply"""
    temperature: float = 1.0
    """sampling temperature of training replies"""
    rank: int = 16
    """LoRA rank"""
    learning_rate: float = 1e-3
    """AdamW learning rate"""
    eval_every: int = 5
    """greedy held-out accuracy every N steps, and before the first"""
    num_test: int = 50
    """held-out problems"""
    seed: int = 0
    """problems and LoRA init"""


Problem = tuple[int, int]


def make_problems(count: int, rng: random.Random) -> list[Problem]:
    return [(rng.randint(0, 10), rng.randint(0, 10)) for _ in range(count)]


def reward(reply: str, problem: Problem) -> float:
    """1 for a right equation, 0 for a wrong one or a right number in another form, -1 else."""
    match = EQUATION.search(reply)
    if match:
        a, b, c = (int(x) for x in match.groups())
        return 1.0 if (a, b) == problem and c == sum(problem) else 0.0
    numbers = re.findall(r"-?\d+", reply)
    return 0.0 if numbers and int(numbers[-1]) == sum(problem) else -1.0


def prompt_tokens(tokenizer: Any, problem: Problem) -> list[int]:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What is {problem[0]} + {problem[1]}?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def group_datums(
    tinker: Any, prompt: list[int], replies: Sequence[Any], rewards: list[float]
) -> list[Any]:
    """One datum per reply, advantages = reward - group mean (not yet divided by tokens)."""
    mean = sum(rewards) / len(rewards)
    datums = []
    for reply, r in zip(replies, rewards, strict=True):
        tokens = [*prompt, *reply.tokens]
        n_prompt, n_reply = len(prompt) - 1, len(reply.tokens)  # targets are tokens[1:]
        datums.append(
            tinker.types.Datum(
                model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "weights": [0.0] * n_prompt + [1.0] * n_reply,
                    "logprobs": [0.0] * n_prompt + list(reply.logprobs),
                    "advantages": [0.0] * n_prompt + [r - mean] * n_reply,
                },
            )
        )
    return datums


def per_token(tinker: Any, datums: list[Any], sampled_tokens: int) -> list[Any]:
    """Advantages divided by the tokens sampled in the batch: the summed loss is a token mean."""
    scaled = []
    for d in datums:
        inputs = {k: v.tolist() for k, v in d.loss_fn_inputs.items()}
        inputs["advantages"] = [a / sampled_tokens for a in inputs["advantages"]]
        scaled.append(tinker.types.Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    return scaled


def accuracy(tinker: Any, sampler: Any, tokenizer: Any, problems: list[Problem]) -> float:
    """Share of held-out problems answered with the right equation, greedy."""
    params = tinker.types.SamplingParams(max_tokens=16, temperature=0.0)
    futures = [
        sampler.sample(tinker.types.ModelInput.from_ints(prompt_tokens(tokenizer, p)), 1, params)
        for p in problems
    ]
    rewards = [
        reward(tokenizer.decode(f.result().sequences[0].tokens), p)
        for f, p in zip(futures, problems, strict=True)
    ]
    return sum(r == 1.0 for r in rewards) / len(rewards)


def train_step(
    tinker: Any, config: Config, training_client: Any, sampler: Any, tokenizer: Any, problems: list
) -> dict[str, float]:
    """Sample groups, score them, take one optimizer step; returns the step's figures."""
    params = tinker.types.SamplingParams(
        max_tokens=config.max_tokens, temperature=config.temperature
    )
    prompts = [prompt_tokens(tokenizer, p) for p in problems]
    # Every group's sample call is in flight before the first result is awaited.
    futures = [
        sampler.sample(tinker.types.ModelInput.from_ints(prompt), config.group_size, params)
        for prompt in prompts
    ]
    datums, all_rewards, sampled = [], [], 0
    for future, prompt, problem in zip(futures, prompts, problems, strict=True):
        replies = future.result().sequences
        rewards = [reward(tokenizer.decode(s.tokens), problem) for s in replies]
        all_rewards += rewards
        sampled += sum(len(s.tokens) for s in replies)
        if len(set(rewards)) > 1:  # a group that scored all the same has no advantage
            datums += group_datums(tinker, prompt, replies, rewards)
    if datums:
        adam = tinker.types.AdamParams(
            learning_rate=config.learning_rate, beta2=0.95, eps=1e-8, grad_clip_norm=1.0
        )
        # Both calls are queued before either is awaited: the trainer runs them back to back.
        fwd_bwd = training_client.forward_backward(per_token(tinker, datums, sampled), "ppo")
        optim = training_client.optim_step(adam)
        fwd_bwd.result()
        optim.result()
    return {
        "reward": sum(all_rewards) / len(all_rewards),
        "right": sum(r == 1.0 for r in all_rewards) / len(all_rewards),
        "datums": float(len(datums)),
    }


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


def main(argv: Sequence[str], service: Any = None) -> list[dict[str, float]]:
    config = parse_config(Config, argv)
    tinker, own = (rl, None) if service is not None else connect(config)
    service = service or own
    rng = random.Random(config.seed)
    test_problems = make_problems(config.num_test, random.Random(config.seed + 1))
    training_client = ready(
        service.create_lora_training_client(config.base_model, rank=config.rank, seed=config.seed)
    )
    tokenizer = training_client.get_tokenizer()
    history = []
    try:
        for step in range(config.num_steps + 1):
            sampler = ready(training_client.save_weights_and_get_sampling_client())
            figures: dict[str, float] = {"step": float(step)}
            due = config.eval_every > 0 and step % config.eval_every == 0
            if due or step == config.num_steps:
                figures["held_out"] = accuracy(tinker, sampler, tokenizer, test_problems)
            if step < config.num_steps:
                began = time.perf_counter()
                problems = make_problems(config.groups_per_batch, rng)
                figures.update(
                    train_step(tinker, config, training_client, sampler, tokenizer, problems)
                )
                figures["seconds"] = time.perf_counter() - began
            print(" ".join(f"{k}={v:.3g}" for k, v in figures.items()), flush=True)
            history.append(figures)
    finally:
        if own is not None:
            # engineroom's stops its embedded Ray; the SDK's ends its session on the server.
            if tinker is rl:
                own.close()
            else:
                own.close("success").result()
    return history


if __name__ == "__main__":
    main(sys.argv[1:])
