"""Agents written against an OpenAI-style client, outside the RL loop: a `ChatClient`
(envs/agent.py) that samples with a `SamplingClient` and keeps every turn's exact tokens, and
the datums such an episode trains as.

    client = sampling_chat_client(sampler, ChatRenderer(tokenizer), SamplingParams(max_tokens=64))
    reward = await play(client, problem)              # any agent on client.chat.completions
    datums = episode_datums(client.turns, advantage=reward - baseline)

Inside `rl.loop.train` the loop samples instead (`envs.agent.AgentDataset`); the tokens are
kept the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from envs.agent import ChatClient, Turn, to_trajectory
from envs.base import StopCondition, Tokens
from envs.chat import ChatRenderer
from rl.client.sampling import SamplingClient
from rl.loop.datums import trajectory_to_datums
from rl.types import Datum, ModelInput, SamplingParams


def sampling_chat_client(
    sampler: SamplingClient, renderer: ChatRenderer, params: SamplingParams | None = None
) -> ChatClient:
    """A ChatClient whose every call samples once with `sampler` at `params` (its `stop` is
    the chat template's end of turn)."""
    base = params or SamplingParams()

    async def complete(prompt: Tokens, stop: StopCondition) -> Turn:
        turn_params = base.model_copy(update={"stop": stop})
        response = await sampler.sample_async(ModelInput.from_ints(prompt), 1, turn_params)
        sequence = response.sequences[0]
        return Turn(
            list(prompt), sequence.tokens, list(sequence.logprobs or []), sequence.stop_reason
        )

    return ChatClient(renderer, complete, model=sampler.get_base_model())


def episode_datums(turns: Sequence[Turn], advantage: float) -> list[Datum]:
    """The datums of a recorded episode: one per run of turns that extend each other, holding
    exactly the sampled tokens with weight 1 and the sampler's logprobs, everything else 0."""
    return trajectory_to_datums(to_trajectory(turns, 0.0), advantage, where="episode")


__all__ = ["episode_datums", "sampling_chat_client"]
