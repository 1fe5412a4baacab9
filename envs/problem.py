"""Single-turn question/answer tasks: the author writes the question, the answer check and,
optionally, a format check; this module turns them into envs, group builders and datasets.

Reward of one reply (as tinker-cookbook's `ProblemEnv`):

    reward = correct + format_coef * (format_ok - 1)

`correct = check_answer(reply_text, answer)` and `format_ok = check_format(reply_text)` (1.0
without a format check), both plain Python callables returning a float, usually 0.0 or 1.0.
A reply cut off by max_tokens (no end-of-turn token) gets format_ok = 0. So a correct,
well-formed reply scores 1, a correct but ill-formed one 1 - format_coef, and a wrong,
ill-formed one -format_coef. A check that returns a non-float or a non-finite value raises
`EnvError`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from envs.base import EnvError, EnvGroupBuilder, StepResult, StopCondition, Tokens, check_reward
from envs.chat import ChatRenderer, Message

AnswerCheck = Callable[[str, str], float]  # (reply text, reference answer) -> correctness
FormatCheck = Callable[[str], float]  # reply text -> 1.0 if well-formed, else 0.0


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


@dataclass(frozen=True)
class ProblemTask:
    """How one kind of problem is posed and graded. Keep the checks module-level functions
    (or `functools.partial`s) so builders pickle."""

    name: str
    check_answer: AnswerCheck
    check_format: FormatCheck | None = None
    format_coef: float = 0.1
    system_prompt: str | None = None
    # Few-shot examples shown before the question, as alternating user/assistant messages.
    prefix_messages: tuple[Message, ...] = ()

    def messages(self, question: str) -> list[Message]:
        messages: list[Message] = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        return [*messages, *self.prefix_messages, {"role": "user", "content": question}]

    def reward(self, reply: str, answer: str, ended: bool) -> tuple[float, dict[str, float]]:
        """(reward, metrics) of one reply; see the module docstring."""
        correct = check_reward(self.check_answer(reply, answer), f"{self.name}: check_answer")
        format_ok = 1.0
        if self.check_format is not None:
            format_ok = check_reward(self.check_format(reply), f"{self.name}: check_format")
        if not ended:
            format_ok = 0.0
        reward = correct + self.format_coef * (format_ok - 1.0)
        return reward, {"correct": correct, "format": format_ok}


class ProblemEnv:
    """One attempt at one problem: a prompt, one reply, a reward."""

    def __init__(self, renderer: ChatRenderer, task: ProblemTask, problem: Problem):
        self.renderer = renderer
        self.task = task
        self.problem = problem

    async def initial_observation(self) -> tuple[Tokens, StopCondition]:
        prompt = self.renderer.build_prompt(self.task.messages(self.problem.question))
        return prompt, self.renderer.stop_condition

    async def step(self, action: Tokens) -> StepResult:
        message, ended = self.renderer.parse_response(action)
        reward, metrics = self.task.reward(message["content"], self.problem.answer, ended)
        return StepResult(reward=reward, episode_done=True, metrics=metrics)


@dataclass(frozen=True)
class ProblemGroupBuilder(EnvGroupBuilder):
    """`group_size` attempts at the same problem."""

    renderer: ChatRenderer
    task: ProblemTask
    problem: Problem
    group_size: int

    async def make_envs(self) -> list[ProblemEnv]:
        return [ProblemEnv(self.renderer, self.task, self.problem) for _ in range(self.group_size)]

    def logging_tags(self) -> list[str]:
        return [self.task.name]


class ProblemDataset:
    """Batches of `batch_size` problems, each a group of `group_size` envs.

    Each epoch visits every problem once in an order shuffled by `seed` and the epoch number
    (`shuffle=False` keeps file order, for eval); a last partial batch is dropped.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        task: ProblemTask,
        renderer: ChatRenderer,
        batch_size: int,
        group_size: int,
        seed: int = 0,
        num_epochs: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1 or group_size < 1 or num_epochs < 1:
            raise EnvError(
                f"batch_size, group_size and num_epochs must be >= 1, got "
                f"{batch_size}, {group_size}, {num_epochs}"
            )
        if len(problems) < batch_size:
            raise EnvError(
                f"{task.name}: {len(problems)} problems, fewer than one batch of {batch_size}"
            )
        self.problems = list(problems)
        self.task, self.renderer = task, renderer
        self.batch_size, self.group_size = batch_size, group_size
        self.seed, self.num_epochs, self.shuffle = seed, num_epochs, shuffle
        self._batches_per_epoch = len(self.problems) // batch_size

    def __len__(self) -> int:
        return self._batches_per_epoch * self.num_epochs

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.task.name}: batch {index} out of range [0, {len(self)})")
        epoch, batch = divmod(index, self._batches_per_epoch)
        order = list(range(len(self.problems)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        picked = order[batch * self.batch_size : (batch + 1) * self.batch_size]
        return [self.make_builder(self.problems[i]) for i in picked]

    def make_builder(self, problem: Problem) -> EnvGroupBuilder:
        """The group builder of one problem (a subclass may play problems its own way)."""
        return ProblemGroupBuilder(self.renderer, self.task, problem, self.group_size)
