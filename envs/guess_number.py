"""Guess the number: a multi-turn env. The model guesses, the env answers "Higher." or
"Lower.", until the guess is right or `max_turns` guesses are used.

Reward: 1.0 on the turn the model guesses right, 0.0 on every other turn, so a trajectory's
total is 1 (success) or 0. Each observation extends the previous observation + action token
for token (`ChatRenderer.build_continuation`), so the whole episode trains as one datum.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from envs.answers import extract_answer
from envs.base import EnvError, EnvGroupBuilder, StepResult, StopCondition, Tokens
from envs.chat import ChatRenderer, Message


class GuessNumberEnv:
    def __init__(self, renderer: ChatRenderer, secret: int, low: int, high: int, max_turns: int):
        self.renderer = renderer
        self.secret, self.low, self.high, self.max_turns = secret, low, high, max_turns
        self.messages: list[Message] = []
        self.observation: Tokens = []
        self.turns = 0
        self.invalid = 0

    async def initial_observation(self) -> tuple[Tokens, StopCondition]:
        rules = (
            f"I am thinking of a whole number between {self.low} and {self.high}. "
            f"You have {self.max_turns} guesses. After each guess I will say 'Higher.' or "
            "'Lower.'. Reply with just your guess."
        )
        self.messages = [{"role": "user", "content": rules}]
        self.observation = self.renderer.build_prompt(self.messages)
        return self.observation, self.renderer.stop_condition

    async def step(self, action: Tokens) -> StepResult:
        message, ended = self.renderer.parse_response(action)
        self.messages.append(message)
        self.turns += 1
        guess = _parse_guess(message["content"])
        if guess is None:
            self.invalid += 1
        if guess == self.secret:
            return StepResult(1.0, episode_done=True, metrics=self._metrics(success=True))
        if self.turns >= self.max_turns:
            return StepResult(0.0, episode_done=True, metrics=self._metrics(success=False))
        if guess is None:
            feedback = f"Please reply with one whole number between {self.low} and {self.high}."
        else:
            feedback = "Higher." if guess < self.secret else "Lower."
        reply: Message = {"role": "user", "content": feedback}
        # A reply cut off by max_tokens gets its end-of-turn token here, in the observation.
        closed = list(action) if ended else [*action, self.renderer.end_of_turn_token]
        self.observation = [
            *self.observation,
            *closed,
            *self.renderer.build_continuation(self.messages, [reply]),
        ]
        self.messages.append(reply)
        return StepResult(0.0, False, self.observation, self.renderer.stop_condition)

    def _metrics(self, success: bool) -> dict[str, float]:
        return {
            "success": float(success),
            "turns": float(self.turns),
            "invalid": float(self.invalid),
        }


def _parse_guess(text: str) -> int | None:
    number = extract_answer(text)
    return int(number) if number is not None and number.is_integer() else None


@dataclass(frozen=True)
class GuessNumberGroupBuilder(EnvGroupBuilder):
    """`group_size` games with the same secret, so their rewards are comparable."""

    renderer: ChatRenderer
    secret: int
    low: int = 1
    high: int = 100
    max_turns: int = 8
    group_size: int = 4

    async def make_envs(self) -> list[GuessNumberEnv]:
        return [
            GuessNumberEnv(self.renderer, self.secret, self.low, self.high, self.max_turns)
            for _ in range(self.group_size)
        ]

    def logging_tags(self) -> list[str]:
        return ["guess_number"]


class GuessNumberDataset:
    """`num_batches` batches of `batch_size` secrets, drawn deterministically from `seed`."""

    def __init__(
        self,
        renderer: ChatRenderer,
        batch_size: int,
        group_size: int,
        num_batches: int,
        seed: int = 0,
        low: int = 1,
        high: int = 100,
        max_turns: int = 8,
    ):
        if min(batch_size, group_size, num_batches, max_turns) < 1 or low > high:
            raise EnvError(
                "guess_number: batch_size, group_size, num_batches, max_turns must be >= 1 and "
                f"low <= high; got {batch_size}, {group_size}, {num_batches}, {max_turns}, "
                f"{low}..{high}"
            )
        self.renderer = renderer
        self.batch_size, self.group_size, self.num_batches = batch_size, group_size, num_batches
        self.seed, self.low, self.high, self.max_turns = seed, low, high, max_turns

    def __len__(self) -> int:
        return self.num_batches

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        if not 0 <= index < len(self):
            raise IndexError(f"guess_number: batch {index} out of range [0, {len(self)})")
        rng = random.Random(self.seed * 1_000_003 + index)
        return [
            GuessNumberGroupBuilder(
                self.renderer,
                secret=rng.randint(self.low, self.high),
                low=self.low,
                high=self.high,
                max_turns=self.max_turns,
                group_size=self.group_size,
            )
            for _ in range(self.batch_size)
        ]


def build_datasets(
    renderer: ChatRenderer,
    batch_size: int,
    group_size: int,
    num_batches: int = 500,
    seed: int = 0,
    num_test: int = 32,
    max_turns: int = 8,
) -> tuple[GuessNumberDataset, GuessNumberDataset]:
    """(train, test): the test set is one batch of `num_test` games, one attempt each."""
    train = GuessNumberDataset(
        renderer, batch_size, group_size, num_batches, seed, max_turns=max_turns
    )
    test = GuessNumberDataset(renderer, num_test, 1, 1, seed + 1_000_000, max_turns=max_turns)
    return train, test
