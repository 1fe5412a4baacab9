"""An agent env for the examples and tests: arithmetic, played by an agent written against the
OpenAI-style `ChatClient` (envs/agent.py), with one retry.

The agent asks the question (the arithmetic task's system prompt and grading); if the reply
is not a correct equation, it tells the model so and asks once more. Reward: 1 for a correct,
well-formed first reply; otherwise half the second reply's reward, less one half, so a retry
that succeeds scores 0 and a first success always wins within a group. Metrics: `correct`
(the first reply's answer, what held-out accuracy counts), `format`, `retry_correct`, `turns`.

    python -m rl.loop.train env=envs.agent_arithmetic:build_datasets env_args=level=1,num_test=100
"""

from __future__ import annotations

from envs.agent import AgentDataset, ChatClient
from envs.arithmetic import LEVELS, TASK, make_problems
from envs.base import EnvError, Metrics
from envs.chat import ChatRenderer
from envs.problem import Problem

RETRY = "That is not right. Check your arithmetic and reply with only the equation and its result."


async def calculator_with_retry(client: ChatClient, problem: Problem) -> tuple[float, Metrics]:
    messages = TASK.messages(problem.question)
    first = await client.chat.completions.create(messages=messages)
    text = first.choices[0].message.content
    reward, metrics = TASK.reward(text, problem.answer, first.choices[0].finish_reason == "stop")
    if reward == 1.0:
        return 1.0, {**metrics, "retry_correct": 0.0, "turns": 1.0}
    messages = [
        *messages,
        {"role": "assistant", "content": text},
        {"role": "user", "content": RETRY},
    ]
    second = await client.chat.completions.create(messages=messages)
    retry_reward, retry = TASK.reward(
        second.choices[0].message.content, problem.answer, second.choices[0].finish_reason == "stop"
    )
    return 0.5 * retry_reward - 0.5, {**metrics, "retry_correct": retry["correct"], "turns": 2.0}


def build_datasets(
    renderer: ChatRenderer,
    batch_size: int,
    group_size: int,
    num_batches: int = 500,
    level: int = 1,
    seed: int = 0,
    num_test: int = 64,
) -> tuple[AgentDataset, AgentDataset]:
    """(train, test) as envs/arithmetic.py draws them, each problem played by the agent."""
    if level not in LEVELS:
        raise EnvError(f"agent_arithmetic: level must be one of {sorted(LEVELS)}, got {level}")
    config = LEVELS[level]
    train = make_problems(num_batches * batch_size, seed, config)
    test = make_problems(num_test, seed + 1_000_000, config)
    agent = calculator_with_retry
    return (
        AgentDataset(train, agent, renderer, batch_size, group_size, "agent_arithmetic", seed=seed),
        AgentDataset(test, agent, renderer, num_test, 1, "agent_arithmetic", shuffle=False),
    )
