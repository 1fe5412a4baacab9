"""Grade-school math word problems from `envs/data/math_word_problems.jsonl` (312 problems
from 24 templates, see `envs.math_word_templates`; 264 train, 48 test, integer answers).

The reply is graded on its extracted answer (boxed, "####", "The answer is N", or the final
number); the format check asks for an explicit answer marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from envs.answers import answer_marker_format, check_number
from envs.base import EnvError
from envs.chat import ChatRenderer, Message
from envs.problem import Problem, ProblemDataset, ProblemTask

DATA_PATH = Path(__file__).parent / "data" / "math_word_problems.jsonl"
SYSTEM_PROMPT = (
    "Solve the math problem step by step. End your reply with 'The answer is N.', "
    "where N is the final number."
)


def load_problems(
    split: Literal["train", "test"], path: Path = DATA_PATH
) -> list[tuple[Problem, str]]:
    """(problem, worked solution) pairs of one split, in file order."""
    if split not in ("train", "test"):
        raise EnvError(f"math_word: split must be 'train' or 'test', got {split!r}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        (Problem(question=row["question"], answer=str(row["answer"])), row["solution"])
        for row in rows
        if row["split"] == split
    ]


def make_task(few_shot: int = 0) -> ProblemTask:
    """The task, with the first `few_shot` training problems as worked examples."""
    examples: list[Message] = []
    for problem, solution in load_problems("train")[:few_shot]:
        examples.append({"role": "user", "content": problem.question})
        examples.append({"role": "assistant", "content": solution})
    return ProblemTask(
        name="math_word",
        check_answer=check_number,
        check_format=answer_marker_format,
        system_prompt=SYSTEM_PROMPT,
        prefix_messages=tuple(examples),
    )


def build_datasets(
    renderer: ChatRenderer,
    batch_size: int,
    group_size: int,
    seed: int = 0,
    num_epochs: int = 1,
    few_shot: int = 0,
) -> tuple[ProblemDataset, ProblemDataset]:
    """(train, test). The test set is one batch of all 48 held-out problems, one attempt each."""
    task = make_task(few_shot)
    # Few-shot examples are the first training problems; keep them out of the training batches.
    train = [p for p, _ in load_problems("train")[few_shot:]]
    test = [p for p, _ in load_problems("test")]
    return (
        ProblemDataset(train, task, renderer, batch_size, group_size, seed, num_epochs),
        ProblemDataset(test, task, renderer, len(test), 1, shuffle=False),
    )
