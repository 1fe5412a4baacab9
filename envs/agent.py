"""Agents written against an OpenAI-style chat client, trained as RL envs on the exact tokens
they sampled.

    async def play(client: ChatClient, problem: Problem) -> float:
        messages = [{"role": "user", "content": problem.question}]
        reply = await client.chat.completions.create(messages=messages)
        text = reply.choices[0].message.content
        ...                                   # call tools, ask again, as the agent likes
        return 1.0 if text.strip() == problem.answer else 0.0

    train, test = AgentDataset(problems, play, renderer, batch_size=12, group_size=8), ...

`play` is plain async Python: it may call the model any number of times, run its own tools
between calls, and returns the episode's reward (or `(reward, metrics)`). Keep it a
module-level function (group builders are pickled).

Exact tokens. A chat API hands the agent text, and the agent hands text back in the next
request's history; tokenizing that history again need not give the tokens that were sampled
(BPE merges differently across a boundary, a stop string, a cut-off turn). So `ChatClient`
keeps what it sampled: when a request's messages begin with the previous request's messages
plus the reply it got, the new prompt is the previous prompt + the sampled tokens (+ the
end-of-turn token if the reply was cut off) + the template's rendering of the new messages
only (`ChatRenderer.build_continuation`). Every turn of such an episode then extends the last
token for token, and the RL loop trains the episode as one datum whose trained tokens are
exactly the sampled ones (weights cover only them). A request whose history differs (the
agent rewrote it) starts a new segment, rendered from scratch; it trains as a datum of its own.

Inside the RL loop (`AgentEnv`), the loop samples: each `create` call hands its prompt to the
loop as the env's next observation and gets the loop's sampled action back, so the rollout
settings (`max_tokens`, `temperature`) are the loop's and the agent's own sampling arguments
are ignored. Outside the loop, `rl.client.chat.SamplingChatClient` samples the same way with a
`SamplingClient` and keeps a record of every turn.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from envs.base import (
    EnvError,
    EnvGroupBuilder,
    Metrics,
    StepResult,
    StopCondition,
    StopReason,
    Tokens,
    Trajectory,
    Transition,
    check_metrics,
    check_reward,
)
from envs.chat import ChatRenderer, Message
from envs.problem import Problem, ProblemDataset, ProblemTask

# -- what `create` returns: the attributes of OpenAI's ChatCompletion an agent reads ---------


@dataclass(frozen=True)
class ChatMessage:
    content: str
    role: str = "assistant"
    tool_calls: None = None  # tools are the agent's own business: it parses the text


@dataclass(frozen=True)
class Choice:
    message: ChatMessage
    finish_reason: str  # "stop" | "length"
    index: int = 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatCompletion:
    id: str
    choices: list[Choice]
    usage: Usage
    model: str = ""
    object: str = "chat.completion"


@dataclass(frozen=True)
class Turn:
    """One model call as sampled: the prompt tokens as rendered, the sampled tokens and the
    sampler's logprobs of them."""

    prompt: Tokens
    tokens: Tokens
    logprobs: list[float]
    stop_reason: StopReason


# The sampler behind a ChatClient: (prompt tokens, stop condition) -> the sampled turn.
Complete = Callable[[Tokens, StopCondition], Awaitable[Turn]]


class ChatClient:
    """`client.chat.completions.create(messages=[...])`, OpenAI's call shape, over `complete`.

    `turns` holds every call's exact tokens, in order. Arguments other than `messages`
    (model, temperature, max_tokens, ...) are accepted and left to the sampler behind it;
    `n` > 1 and `tools` are refused (sample n times; describe tools in the messages).
    """

    def __init__(self, renderer: ChatRenderer, complete: Complete, model: str = ""):
        self.renderer = renderer
        self.model = model
        self.turns: list[Turn] = []
        self._complete = complete
        self._history: list[Message] | None = None  # the last call's messages + its reply
        self.chat = _Chat(self)

    async def create(self, messages: Sequence[Any], **kwargs: Any) -> ChatCompletion:
        if kwargs.get("n", 1) != 1:
            raise EnvError(f"ChatClient: n={kwargs['n']}; call create once per sample")
        if kwargs.get("tools"):
            raise EnvError("ChatClient: tools= is not supported; describe the tools in a message")
        conversation = [_message(m, i) for i, m in enumerate(messages)]
        turn = await self._complete(self.prompt_for(conversation), self.renderer.stop_condition)
        self.turns.append(turn)
        reply, _ = self.renderer.parse_response(turn.tokens)
        self._history = [*conversation, reply]
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            choices=[Choice(ChatMessage(reply["content"]), turn.stop_reason)],
            usage=Usage(len(turn.prompt), len(turn.tokens)),
            model=self.model,
        )

    def prompt_for(self, conversation: list[Message]) -> Tokens:
        """The prompt tokens of `conversation`: an exact extension of the last turn when its
        history is that turn's messages and reply, else rendered from scratch."""
        history = self._history
        if history is None or not self.turns or conversation[: len(history)] != history:
            return self.renderer.build_prompt(conversation)
        last = self.turns[-1]
        _, ended = self.renderer.parse_response(last.tokens)
        closed = list(last.tokens) if ended else [*last.tokens, self.renderer.end_of_turn_token]
        new = conversation[len(history) :]
        return [*last.prompt, *closed, *self.renderer.build_continuation(history, new)]


class _Chat:
    def __init__(self, client: ChatClient):
        self.completions = _Completions(client)


class _Completions:
    def __init__(self, client: ChatClient):
        self._client = client

    async def create(self, messages: Sequence[Any], **kwargs: Any) -> ChatCompletion:
        return await self._client.create(messages, **kwargs)


def _message(value: Any, index: int) -> Message:
    """A chat message from a dict or a message object (e.g. a returned `ChatMessage`)."""
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    content = value.get("content") if isinstance(value, dict) else getattr(value, "content", None)
    if role not in ("system", "user", "assistant") or not isinstance(content, str):
        raise EnvError(
            f"ChatClient: messages[{index}] needs role system/user/assistant and str content, "
            f"got {value!r}"
        )
    return {"role": role, "content": content}


# -- the bridge into the RL loop ------------------------------------------------------------

Episode = Callable[[ChatClient, Problem], Awaitable[float | tuple[float, Metrics]]]


class AgentEnv:
    """One episode of `episode`: each model call is a turn the loop samples (see the module
    docstring); the reward comes when the agent returns."""

    def __init__(self, renderer: ChatRenderer, episode: Episode, problem: Problem):
        self.renderer, self.episode, self.problem = renderer, episode, problem
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._reply: asyncio.Future[Turn] | None = None
        self._prompt: Tokens = []
        self._task: asyncio.Task | None = None

    async def initial_observation(self) -> tuple[Tokens, StopCondition]:
        self._task = asyncio.create_task(self._play())
        kind, value = await self._events.get()
        if kind != "call":
            self._check_finished(kind, value)
            raise EnvError("AgentEnv: the agent returned without calling the model")
        return value, self.renderer.stop_condition

    async def step(self, action: Tokens) -> StepResult:
        assert self._reply is not None, "step before initial_observation"
        _, ended = self.renderer.parse_response(action)
        # The loop keeps the logprobs; the agent needs only the tokens.
        self._reply.set_result(Turn(self._prompt, list(action), [], "stop" if ended else "length"))
        kind, value = await self._events.get()
        if kind == "call":
            return StepResult(0.0, False, value, self.renderer.stop_condition)
        reward, metrics = self._check_finished(kind, value)
        return StepResult(reward, episode_done=True, metrics=metrics)

    async def _play(self) -> None:
        client = ChatClient(self.renderer, self._hand_to_loop)
        try:
            result = await self.episode(client, self.problem)
        except Exception as error:
            await self._events.put(("error", error))
        else:
            await self._events.put(("done", result))

    async def _hand_to_loop(self, prompt: Tokens, stop: StopCondition) -> Turn:
        self._prompt = prompt
        self._reply = asyncio.get_running_loop().create_future()
        await self._events.put(("call", prompt))
        return await self._reply

    def _check_finished(self, kind: str, value: Any) -> tuple[float, Metrics]:
        if kind == "error":
            raise EnvError(f"AgentEnv: the agent raised {value!r}") from value
        reward, metrics = value if isinstance(value, tuple) else (value, {})
        where = "AgentEnv: the agent's result"
        return check_reward(reward, where), check_metrics(metrics, where)


@dataclass(frozen=True)
class AgentGroupBuilder(EnvGroupBuilder):
    """`group_size` episodes of the agent on one problem."""

    renderer: ChatRenderer
    episode: Episode
    problem: Problem
    group_size: int
    name: str = "agent"

    async def make_envs(self) -> list[AgentEnv]:
        return [AgentEnv(self.renderer, self.episode, self.problem) for _ in range(self.group_size)]

    def logging_tags(self) -> list[str]:
        return [self.name]


class AgentDataset(ProblemDataset):
    """Batches of problems (ProblemDataset's order and epochs), each played by `episode`."""

    def __init__(
        self,
        problems: Sequence[Problem],
        episode: Episode,
        renderer: ChatRenderer,
        batch_size: int,
        group_size: int,
        name: str = "agent",
        **order: Any,
    ):
        super().__init__(problems, _named(name), renderer, batch_size, group_size, **order)
        self.episode = episode

    def make_builder(self, problem: Problem) -> EnvGroupBuilder:
        return AgentGroupBuilder(
            self.renderer, self.episode, problem, self.group_size, self.task.name
        )


def _named(name: str) -> ProblemTask:
    """A task that only names the dataset: the agent grades its own episodes."""
    return ProblemTask(name=name, check_answer=_graded_by_the_agent)


def _graded_by_the_agent(reply: str, answer: str) -> float:
    raise EnvError("an AgentDataset's episodes are graded by their agent")


def to_trajectory(turns: Sequence[Turn], reward: float) -> Trajectory:
    """An episode played outside the loop (its client's `turns`) as a Trajectory with the
    reward on its last turn, for `rl.loop.datums.trajectory_to_datums`."""
    if not turns:
        raise EnvError("to_trajectory: the episode has no turns")
    transitions = [
        Transition(
            observation=list(turn.prompt),
            action_tokens=list(turn.tokens),
            action_logprobs=list(turn.logprobs),
            reward=reward if i == len(turns) - 1 else 0.0,
            episode_done=i == len(turns) - 1,
            stop_reason=turn.stop_reason,
        )
        for i, turn in enumerate(turns)
    ]
    return Trajectory(transitions)


__all__ = [
    "AgentDataset",
    "AgentEnv",
    "AgentGroupBuilder",
    "ChatClient",
    "ChatCompletion",
    "Episode",
    "Turn",
    "to_trajectory",
]
