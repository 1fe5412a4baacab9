"""Agents written against an OpenAI-style client, outside the RL loop: a `ChatClient`
(envs/agent.py) that samples with a `SamplingClient`, or through a server's OpenAI door, and
keeps every turn's exact tokens, and the datums such an episode trains as.

    client = sampling_chat_client(sampler, ChatRenderer(tokenizer), SamplingParams(max_tokens=64))
    reward = await play(client, problem)              # any agent on client.chat.completions
    datums = episode_datums(client.turns, advantage=reward - baseline)

Through a server (`python -m rl.server`), the same with `server_chat_client(openai.AsyncOpenAI(
base_url=".../oai/api/v1", api_key=key), model, renderer, params)`: the client renders the
prompt tokens here and the door samples them as they are, returning the tokens it sampled and
their logprobs (vLLM's `return_token_ids`).

Inside `rl.loop.train` the loop samples instead (`envs.agent.AgentDataset`); the tokens are
kept the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envs.agent import ChatClient, Turn, to_trajectory
from envs.base import EnvError, StopCondition, Tokens
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


def server_chat_client(
    openai_client: Any, model: str, renderer: ChatRenderer, params: SamplingParams | None = None
) -> ChatClient:
    """A ChatClient whose every call samples once through a server's OpenAI door:
    `POST /completions` with the prompt as token ids, the renderer's stop condition
    (`stop_token_ids`, or `stop` strings) and `return_token_ids`. `openai_client` is an `openai.AsyncOpenAI` for
    the door (`base_url=<server>/oai/api/v1`, `api_key=` the caller's key); `model` a base
    model the server serves or a `tinker://` sampler path of the caller's. The door's
    logprobs are the model's own (`params.logprobs_mode="model"`)."""
    base = params or SamplingParams()
    if base.logprobs_mode != "model":
        raise EnvError("server_chat_client: the door returns logprobs_mode='model' logprobs")
    request: dict[str, Any] = {
        "temperature": base.temperature,
        "top_p": base.top_p,
        **({"max_tokens": base.max_tokens} if base.max_tokens is not None else {}),
        **({"seed": base.seed} if base.seed is not None else {}),
    }

    async def complete(prompt: Tokens, stop: StopCondition) -> Turn:
        strings = any(isinstance(item, str) for item in stop)
        extra: dict[str, Any] = {"return_token_ids": True}
        extra["stop" if strings else "stop_token_ids"] = list(stop)
        if base.top_k != -1:
            extra["top_k"] = base.top_k
        answer = await openai_client.completions.create(
            model=model, prompt=list(prompt), logprobs=0, extra_body=extra, **request
        )
        choice = answer.choices[0].model_dump()
        if choice.get("prompt_token_ids") != list(prompt) or choice.get("token_ids") is None:
            raise EnvError(
                "server_chat_client: the server did not sample the prompt as sent (or sent no "
                "token ids); is it an engineroom server's /oai/api/v1?"
            )
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
        ended = choice.get("finish_reason") != "length"
        return Turn(
            list(prompt), list(choice["token_ids"]), list(logprobs), "stop" if ended else "length"
        )

    return ChatClient(renderer, complete, model=model)


def episode_datums(turns: Sequence[Turn], advantage: float) -> list[Datum]:
    """The datums of a recorded episode: one per run of turns that extend each other, holding
    exactly the sampled tokens with weight 1 and the sampler's logprobs, everything else 0."""
    return trajectory_to_datums(to_trajectory(turns, 0.0), advantage, where="episode")


__all__ = ["episode_datums", "sampling_chat_client", "server_chat_client"]
