"""Generated arithmetic problems ("What is 7 + 12 * 3?"), seeded, with configurable difficulty.

The reply is graded on its final number (`envs.answers.check_number`); the format check asks
for the equation with its result ("3 + 7 = 10", `envs.answers.equation_format`), a form that
SmolLM2-135M-Instruct reaches now and then and RL makes the rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from envs.answers import check_number, equation_format
from envs.base import EnvError
from envs.chat import ChatRenderer
from envs.problem import Problem, ProblemDataset, ProblemTask


@dataclass(frozen=True)
class ArithmeticConfig:
    num_operands: int = 2
    """How many numbers in the expression (>= 2)."""
    max_operand: int = 20
    """Operands are drawn from 0..max_operand."""
    operators: str = "+-"
    """Which of + - * may appear; * binds tighter, as usual."""


LEVELS = {
    1: ArithmeticConfig(num_operands=2, max_operand=10, operators="+"),
    2: ArithmeticConfig(num_operands=2, max_operand=50, operators="+-"),
    3: ArithmeticConfig(num_operands=3, max_operand=20, operators="+-*"),
    4: ArithmeticConfig(num_operands=4, max_operand=100, operators="+-*"),
}

TASK = ProblemTask(
    name="arithmetic",
    check_answer=check_number,
    # The asked-for form is one the small model can reach: it writes "a + b = c" now and then
    # (a bare number almost never at temperature 1), and RL makes it the rule.
    check_format=equation_format,
    # The format weighs as much as the answer: a correct reply in another form scores 0, as does
    # a wrong equation, so a group rewards whichever of the two a reply gets right.
    format_coef=1.0,
    system_prompt=(
        "You are a calculator. Reply with only the equation and its result, like 2 + 2 = 4."
    ),
)


def evaluate(operands: list[int], operators: list[str]) -> int:
    """Value of operands[0] op0 operands[1] op1 ... with * before + and -."""
    terms, signs = [operands[0]], [1]
    for op, value in zip(operators, operands[1:], strict=True):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def make_problem(rng: random.Random, config: ArithmeticConfig) -> Problem:
    if config.num_operands < 2 or config.max_operand < 1:
        raise EnvError(f"arithmetic: need num_operands >= 2 and max_operand >= 1, got {config}")
    if not config.operators or set(config.operators) - set("+-*"):
        raise EnvError(f"arithmetic: operators must be a non-empty subset of '+-*', got {config}")
    operands = [rng.randint(0, config.max_operand) for _ in range(config.num_operands)]
    operators = [rng.choice(config.operators) for _ in range(config.num_operands - 1)]
    expression = " ".join(
        [str(operands[0])] + [f"{op} {v}" for op, v in zip(operators, operands[1:], strict=True)]
    )
    return Problem(question=f"What is {expression}?", answer=str(evaluate(operands, operators)))


def make_problems(n: int, seed: int, config: ArithmeticConfig) -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, config) for _ in range(n)]


def build_datasets(
    renderer: ChatRenderer,
    batch_size: int,
    group_size: int,
    num_batches: int = 500,
    level: int = 2,
    seed: int = 0,
    num_test: int = 64,
) -> tuple[ProblemDataset, ProblemDataset]:
    """(train, test): `num_batches` batches of fresh problems, and `num_test` held-out ones
    (drawn from another seed; at easy levels some may coincide with training problems)."""
    if level not in LEVELS:
        raise EnvError(f"arithmetic: level must be one of {sorted(LEVELS)}, got {level}")
    config = LEVELS[level]
    train = make_problems(num_batches * batch_size, seed, config)
    test = make_problems(num_test, seed + 1_000_000, config)
    return (
        ProblemDataset(train, TASK, renderer, batch_size, group_size, seed=seed),
        ProblemDataset(test, TASK, renderer, num_test, 1, shuffle=False),
    )
