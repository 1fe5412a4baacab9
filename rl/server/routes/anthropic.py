"""Anthropic's Messages API at Tinker's paths, under `/anthropic/api/v1`: `POST /messages` and
`POST /messages/count_tokens`. The key is `x-api-key` (or `Authorization: Bearer`); requests
and answers are rl/server/anthropic_compat.py's, the sampling rl/server/inference.py's."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rl.client.sampling import SamplingClient
from rl.server import anthropic_compat as ant
from rl.server.chat import finish, new_id, render_chat
from rl.server.inference import sample
from rl.server.routes.common import State
from rl.server.routes.door import answer, body_of, events, sampler
from rl.server.state import ServerState

router = APIRouter()


@router.post("/messages")
async def messages(request: Request, state: State) -> Response:
    return await answer(request, lambda who: _message(request, state, who), ant.error_body)


@router.post("/messages/count_tokens")
async def count_tokens(request: Request, state: State) -> Response:
    async def handle(who: str) -> Response:
        body = await body_of(request, ant.CountTokensRequest)
        _, _, prompt = await _prepare(request, state, who, body)
        return JSONResponse({"input_tokens": len(prompt)})

    return await answer(request, handle, ant.error_body)


async def _prepare(
    request: Request, state: ServerState, who: str, body: ant.CountTokensRequest
) -> tuple[SamplingClient, Any, list[int]]:
    """(the sampling client, the tokenizer, the prompt tokens) of `body`."""
    ant.check(body)
    client, tokenizer = await sampler(request, state, who, body.model)
    prompt = await asyncio.to_thread(
        render_chat,
        tokenizer,
        ant.chat_messages(body),
        ant.chat_tools(body),
        continue_final=ant.continues(body),
    )
    return client, tokenizer, prompt


async def _message(request: Request, state: ServerState, who: str) -> Response:
    body = await body_of(request, ant.MessagesRequest)
    client, tokenizer, prompt = await _prepare(request, state, who, body)
    [response] = await sample(state, who, client, [prompt], 1, ant.params(body))
    stops = body.stop_sequences or []
    finished = await asyncio.to_thread(finish, tokenizer, response.sequences[0], stops)
    reply = ant.Reply(new_id("msg_"), body.model, len(prompt))
    tools = ant.chat_tools(body) is not None
    if body.stream:
        return events(ant.message_events(reply, finished, tools))
    return JSONResponse(ant.message_body(reply, finished, tools))
