"""OpenAI's API at Tinker's paths, under `/oai/api/v1`: `POST /chat/completions`,
`POST /completions`, `GET /models`. The key is `Authorization: Bearer` (or `x-api-key`);
requests and answers are rl/server/openai_compat.py's, the sampling rl/server/inference.py's."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rl.server import openai_compat as oai
from rl.server.chat import finish, new_id, render_chat, stop_strings
from rl.server.inference import model_names, sample
from rl.server.routes.common import State
from rl.server.routes.door import answer, body_of, events, sampler
from rl.server.state import ServerState

router = APIRouter()


@router.get("/models")
async def models(request: Request, state: State) -> Response:
    async def handle(who: str) -> Response:
        names = await asyncio.to_thread(model_names, state, who)
        return JSONResponse(oai.models_body(names))

    return await answer(request, handle, oai.error_body)


@router.post("/chat/completions")
async def chat_completions(request: Request, state: State) -> Response:
    return await answer(request, lambda who: _chat(request, state, who), oai.error_body)


@router.post("/completions")
async def completions(request: Request, state: State) -> Response:
    return await answer(request, lambda who: _complete(request, state, who), oai.error_body)


async def _chat(request: Request, state: ServerState, who: str) -> Response:
    body = await body_of(request, oai.ChatRequest)
    oai.check(body)
    client, tokenizer = await sampler(request, state, who, body.model)
    tools = oai.chat_tools(body)
    prompt = await asyncio.to_thread(render_chat, tokenizer, oai.chat_messages(body), tools)
    logprobs = oai.chat_logprobs(body)
    params = oai.chat_params(body, tokenizer.eos_token_id)
    [response] = await sample(state, who, client, [prompt], body.n, params, logprobs or 0)
    stops = stop_strings(body.stop)
    finished = await asyncio.to_thread(
        lambda: [finish(tokenizer, s, stops) for s in response.sequences]
    )
    reply = oai.Reply(
        new_id("chatcmpl-"),
        body.model,
        int(time.time()),
        len(prompt),
        logprobs,
        bool(body.return_tokens_as_token_ids),
        (tuple(prompt),) if body.return_token_ids else None,
    )
    if body.stream:
        with_usage = bool((body.stream_options or {}).get("include_usage"))
        chunks = await asyncio.to_thread(
            oai.chat_events, reply, tokenizer, finished, tools is not None, with_usage
        )
        return events(chunks)
    return JSONResponse(
        await asyncio.to_thread(oai.chat_body, reply, tokenizer, finished, tools is not None)
    )


async def _complete(request: Request, state: ServerState, who: str) -> Response:
    body = await body_of(request, oai.CompletionRequest)
    oai.check(body)
    client, tokenizer = await sampler(request, state, who, body.model)
    prompts = await asyncio.to_thread(oai.completion_prompts, tokenizer, body)
    params = oai.completion_params(body, tokenizer.eos_token_id)
    responses = await sample(state, who, client, prompts, body.n, params, body.logprobs or 0)
    stops = stop_strings(body.stop)
    finished = await asyncio.to_thread(
        lambda: [finish(tokenizer, s, stops) for r in responses for s in r.sequences]
    )
    reply = oai.Reply(
        new_id("cmpl-"),
        body.model,
        int(time.time()),
        sum(len(p) for p in prompts),
        body.logprobs,
        bool(body.return_tokens_as_token_ids),
        tuple(tuple(p) for p in prompts) if body.return_token_ids else None,
    )
    if body.stream:
        with_usage = bool((body.stream_options or {}).get("include_usage"))
        chunks = await asyncio.to_thread(
            oai.completion_events, reply, tokenizer, finished, with_usage
        )
        return events(chunks)
    return JSONResponse(await asyncio.to_thread(oai.completion_body, reply, tokenizer, finished))
