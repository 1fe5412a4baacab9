"""A new RL environment in one file: "reply with a word of exactly N letters", trained by rl.loop.train.

    python examples/custom_env.py                    # SmolLM2, a few steps
    python -m rl.loop.train env=examples.custom_env:build_datasets env_args= max_tokens=8

An env is a prompt, a reward function and a dataset of problems; `envs.problem` turns them into
single-turn envs and group builders. The reward is dense (1 for the right length, less the
further off), so even a model that is rarely exactly right gets a signal to climb. The task's
`correct` metric is that score, so the loop's "accuracy" here is the mean score, not the share
of exact matches.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Any

from envs.chat import ChatRenderer
from envs.problem import Problem, ProblemDataset, ProblemTask

LENGTHS = range(3, 9)


def word_length_score(reply: str, answer: str) -> float:
    """1.0 for a first word of exactly `answer` letters, down to 0.0 at twice as far."""
    words = re.findall(r"[A-Za-z]+", reply)
    if not words:
        return 0.0
    target = int(answer)
    return max(0.0, 1.0 - abs(len(words[0]) - target) / target)


def single_word(reply: str) -> float:
    """The format asked for: one word and nothing else."""
    return float(re.fullmatch(r"\s*[A-Za-z]+[.!]?\s*", reply) is not None)


TASK = ProblemTask(
    name="word_length",
    check_answer=word_length_score,
    check_format=single_word,
    system_prompt="Reply with a single English word and nothing else.",
)


def make_problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    lengths = [rng.choice(LENGTHS) for _ in range(n)]
    return [Problem(f"Give me a word with exactly {k} letters.", str(k)) for k in lengths]


def build_datasets(
    renderer: ChatRenderer, batch_size: int, group_size: int, seed: int = 0, num_test: int = 24
) -> tuple[ProblemDataset, ProblemDataset]:
    """(train, test) in the shape rl.loop.train expects from `env=module:function`."""
    train = ProblemDataset(
        make_problems(200 * batch_size, seed), TASK, renderer, batch_size, group_size, seed
    )
    test = ProblemDataset(
        make_problems(num_test, seed + 1), TASK, renderer, num_test, 1, shuffle=False
    )
    return train, test


def main(argv: list[str], service: Any = None) -> Any:
    from rl.loop.train import main as train

    # `env=examples.custom_env:...` is imported by name; make the repo root importable.
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    defaults = [
        "env=examples.custom_env:build_datasets",
        "env_args=",
        "num_steps=10",
        "groups_per_batch=8",
        "group_size=8",
        "max_tokens=8",
        "eval_every=5",
        "log_dir=runs/custom_env",
    ]
    return train([*defaults, *argv], service=service)


if __name__ == "__main__":
    main(sys.argv[1:])
