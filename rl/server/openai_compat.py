"""OpenAI's chat completions and completions, as request records and answer builders.

Pure: a request becomes prompt tokens and `SamplingParams`; sampled sequences (rl/server/chat.py
`Finished`) become the answer's JSON, or its server-sent events. The routes are
rl/server/routes/openai.py.

Where it departs from OpenAI:
- Logprobs are the model's own logprobs of the sampled tokens (temperature, top-p and top-k not
  applied), as Tinker's sampler returns them; every sampled token has one, the EOS and a stop
  string's tokens included, and `usage.completion_tokens` counts them all.
- vLLM's extensions: `return_tokens_as_token_ids` names logprob tokens `token_id:N`; `top_k`
  limits sampling to the k likeliest tokens; `stop_token_ids` stops at those tokens (and at
  EOS), with no `stop` strings beside them; `return_token_ids` adds the prompt's tokens as
  rendered (`prompt_token_ids`: the answer's, or each completion choice's) and every sampled
  token (`token_ids`, each choice's, or each chunk's in a stream), which is what an RL loop
  trains on (rl/loop/agents.py `server_chat_client`).
- A stream is the finished answer sent as chunks, one per token: the sampler gives no tokens
  before the sequence is done, so the first chunk comes when the whole answer is ready.
- Refused with 400 (not ignored): `echo`, `suffix`, `best_of` above `n`, `logit_bias`,
  non-zero presence or frequency penalties, a `response_format` other than text, and a
  `tool_choice` that forces a tool (the sampler cannot force one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from rl.errors import InvalidRequestError
from rl.server.chat import (
    Finished,
    ToolCall,
    parse_tool_calls,
    sampling_params,
    sse,
    stop_strings,
    template_tool_call,
    token_text,
)
from rl.types import SamplingParams


class _Request(BaseModel):
    """What chat completions and completions share; unknown fields are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    return_tokens_as_token_ids: bool | None = None  # vLLM's extension
    return_token_ids: bool | None = None  # vLLM's extension
    stop_token_ids: list[int] | None = None  # vLLM's extension


class ChatRequest(_Request):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


@dataclass(frozen=True)
class Reply:
    """What every part of one answer repeats."""

    id: str
    model: str
    created: int
    prompt_tokens: int  # over all prompts
    logprobs: int | None  # None: no logprobs; k: with the k likeliest at each token
    token_ids: bool = False  # name logprob tokens `token_id:N`
    prompts: tuple[tuple[int, ...], ...] | None = None  # with return_token_ids: each prompt


def check(request: ChatRequest | CompletionRequest) -> None:
    """Raises InvalidRequestError for what this server does not do (rather than ignore it)."""
    refused = {
        "n must be >= 1": request.n < 1,
        "logit_bias is not supported": bool(request.logit_bias),
        "presence_penalty is not supported": bool(request.presence_penalty),
        "frequency_penalty is not supported": bool(request.frequency_penalty),
        "stop and stop_token_ids together are not supported: give one": bool(
            request.stop_token_ids and stop_strings(request.stop)
        ),
    }
    if isinstance(request, ChatRequest):
        format_type = (request.response_format or {}).get("type", "text")
        refused |= {
            f"response_format {format_type!r} is not supported": format_type != "text",
            "top_logprobs needs logprobs=true": bool(request.top_logprobs) and not request.logprobs,
            "tool_choice can only be 'auto' or 'none' here: the sampler cannot force a tool "
            "call": request.tool_choice not in (None, "auto", "none"),
        }
    else:
        refused |= {
            "echo is not supported": bool(request.echo),
            "suffix is not supported": request.suffix is not None,
            "best_of above n is not supported": (request.best_of or request.n) > request.n,
        }
    problems = [what for what, bad in refused.items() if bad]
    if problems:
        raise InvalidRequestError("; ".join(problems))


def chat_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The messages as chat templates read them: text content, tool calls with dict args."""
    return [_template_message(i, m) for i, m in enumerate(request.messages)]


def _template_message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise InvalidRequestError(f"messages[{i}].role {role!r} is not a chat role")
    out: dict[str, Any] = {
        "role": "system" if role == "developer" else role,
        "content": message_text(message.get("content"), f"messages[{i}].content"),
    }
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [
            template_tool_call(
                c.get("function", {}).get("name", ""),
                c.get("function", {}).get("arguments", "{}"),
                c.get("id"),
            )
            for c in calls
        ]
    for key in ("tool_call_id", "name"):
        if key in message:
            out[key] = message[key]
    return out


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or the text of its text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where} must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequestError(f"{where}[{j}] is a {kind!r} part; this server takes text")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def chat_tools(request: ChatRequest) -> list[dict[str, Any]] | None:
    """The tools to render, none with `tool_choice="none"`."""
    return None if request.tool_choice == "none" or not request.tools else request.tools


def chat_params(request: ChatRequest, eos_token_id: int | None) -> SamplingParams:
    max_tokens = request.max_completion_tokens or request.max_tokens
    params = sampling_params(
        max_tokens, request.temperature, request.top_p, request.top_k, request.stop, request.seed
    )
    return _with_stop_tokens(params, request, eos_token_id)


def chat_logprobs(request: ChatRequest) -> int | None:
    return (request.top_logprobs or 0) if request.logprobs else None


def completion_params(request: CompletionRequest, eos_token_id: int | None) -> SamplingParams:
    params = sampling_params(
        request.max_tokens,
        request.temperature,
        request.top_p,
        request.top_k,
        request.stop,
        request.seed,
    )
    return _with_stop_tokens(params, request, eos_token_id)


def _with_stop_tokens(
    params: SamplingParams, request: _Request, eos_token_id: int | None
) -> SamplingParams:
    """`stop_token_ids` as the sampler's stop, EOS kept (a token stop replaces EOS stopping
    in the sampler; in vLLM's API it adds to it)."""
    if not request.stop_token_ids:
        return params
    stops = [int(t) for t in request.stop_token_ids]
    if eos_token_id is not None and int(eos_token_id) not in stops:
        stops.append(int(eos_token_id))
    return params.model_copy(update={"stop": stops})


def completion_prompts(tokenizer: Any, request: CompletionRequest) -> list[list[int]]:
    """Each prompt's tokens: text encoded as the tokenizer does by default (BOS included where
    the model has one), token ids as they are."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [list(tokenizer.encode(prompt))]
    if not prompt:
        raise InvalidRequestError("prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [[int(t) for t in prompt]]  # type: ignore[arg-type]
    if all(isinstance(p, str) for p in prompt):
        return [list(tokenizer.encode(p)) for p in prompt]
    return [[int(t) for t in p] for p in prompt]  # type: ignore[union-attr]


# -- answers ---------------------------------------------------------------------------------


def usage(prompt_tokens: int, finished: list[Finished]) -> dict[str, int]:
    completion = sum(len(f.tokens) for f in finished)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _content_and_calls(finished: Finished, tools: bool) -> tuple[str, list[ToolCall]]:
    return parse_tool_calls(finished.text) if tools else (finished.text, [])


def chat_body(
    reply: Reply, tokenizer: Any, finished: list[Finished], tools: bool
) -> dict[str, Any]:
    """A `chat.completion` object."""
    choices = []
    for index, f in enumerate(finished):
        content, calls = _content_and_calls(f, tools)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:  # with tool calls and no text around them, the content is null
            message |= {"content": content or None, "tool_calls": [_tool_call(c) for c in calls]}
        logprobs = _chat_logprobs(reply, tokenizer, f)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": {"content": logprobs} if logprobs is not None else None,
                "finish_reason": "tool_calls" if calls else f.reason,
                **_token_ids(reply, f.tokens),
            }
        )
    return {
        **_head(reply, "chat.completion"),
        "choices": choices,
        "usage": usage(reply.prompt_tokens, finished),
        **_prompt_ids(reply, 0),
    }


def chat_events(
    reply: Reply, tokenizer: Any, finished: list[Finished], tools: bool, with_usage: bool
) -> list[bytes]:
    """The `chat.completion.chunk` events of the answer, ending with `data: [DONE]`: per
    choice its role, a chunk per token (or its text and tool calls), and its finish reason."""
    events = []
    for index, f in enumerate(finished):
        prompt = _prompt_ids(reply, 0) if index == 0 else None  # vLLM's: on the first chunk
        events.append(_chunk(reply, index, {"role": "assistant", "content": ""}, top=prompt))
        content, calls = _content_and_calls(f, tools)
        logprobs = _chat_logprobs(reply, tokenizer, f)
        if calls:
            text = _chunk(reply, index, {"content": content or None}, logprobs, ids=f.tokens)
            deltas = [{"index": j, **_tool_call(c)} for j, c in enumerate(calls)]
            events += [text, _chunk(reply, index, {"tool_calls": deltas})]
        else:
            for j, piece in enumerate(f.pieces):
                token_logprobs = logprobs[j : j + 1] if logprobs is not None else None
                ids = f.tokens[j : j + 1]
                if piece or token_logprobs or (reply.prompts is not None and ids):
                    events.append(_chunk(reply, index, {"content": piece}, token_logprobs, ids=ids))
        reason = "tool_calls" if calls else f.reason
        events.append(_chunk(reply, index, {}, finish_reason=reason))
    if with_usage:
        chunk = {**_head(reply, "chat.completion.chunk"), "choices": []}
        events.append(sse({**chunk, "usage": usage(reply.prompt_tokens, finished)}))
    return [*events, sse("[DONE]")]


def _head(reply: Reply, kind: str) -> dict[str, Any]:
    return {"id": reply.id, "object": kind, "created": reply.created, "model": reply.model}


def _chunk(
    reply: Reply,
    index: int,
    delta: dict[str, Any],
    logprobs: list[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
    ids: list[int] | None = None,
    top: dict[str, Any] | None = None,
) -> bytes:
    choice = {
        "index": index,
        "delta": delta,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
        "finish_reason": finish_reason,
        **_token_ids(reply, ids or []),
    }
    return sse({**_head(reply, "chat.completion.chunk"), "choices": [choice], **(top or {})})


def _token_ids(reply: Reply, tokens: list[int]) -> dict[str, Any]:
    """A choice's `token_ids` when the request asked for them (`return_token_ids`)."""
    return {"token_ids": list(tokens)} if reply.prompts is not None else {}


def _prompt_ids(reply: Reply, prompt: int) -> dict[str, Any]:
    """`prompt_token_ids` of prompt `prompt` when the request asked for them."""
    return {"prompt_token_ids": list(reply.prompts[prompt])} if reply.prompts is not None else {}


def _prompt_of(reply: Reply, finished: list[Finished], index: int) -> int:
    """The prompt of completion choice `index` (choice i * n + j is prompt i's sample j)."""
    per_prompt = max(1, len(finished) // max(1, len(reply.prompts or ())))
    return index // per_prompt


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _chat_logprobs(reply: Reply, tokenizer: Any, f: Finished) -> list[dict[str, Any]] | None:
    """Per sampled token: its text, bytes, logprob and the `reply.logprobs` likeliest."""
    if reply.logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token, reply.token_ids)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    out = []
    for i, (token, logprob) in enumerate(zip(f.tokens, f.logprobs or [], strict=False)):
        best = _top(f, i, reply.logprobs)
        out.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in best]})
    return out


def _top(f: Finished, i: int, k: int) -> list[tuple[int, float]]:
    if k <= 0 or f.top_logprobs is None or f.top_logprobs[i] is None:
        return []
    return list(f.top_logprobs[i] or [])[:k]


def completion_body(reply: Reply, tokenizer: Any, finished: list[Finished]) -> dict[str, Any]:
    """A `text_completion` object; choice `i * n + j` is prompt i's sample j."""
    choices = [
        {
            "index": index,
            "text": f.text,
            "logprobs": _completion_logprobs(reply, tokenizer, f, range(len(f.tokens))),
            "finish_reason": f.reason,
            **_prompt_ids(reply, _prompt_of(reply, finished, index)),
            **_token_ids(reply, f.tokens),
        }
        for index, f in enumerate(finished)
    ]
    return {
        **_head(reply, "text_completion"),
        "choices": choices,
        "usage": usage(reply.prompt_tokens, finished),
    }


def completion_events(
    reply: Reply, tokenizer: Any, finished: list[Finished], with_usage: bool
) -> list[bytes]:
    """The `text_completion` chunks: one per token, a last one with the finish reason."""
    events = []
    for index, f in enumerate(finished):
        prompt = _prompt_ids(reply, _prompt_of(reply, finished, index))
        for j, piece in enumerate(f.pieces):
            logprobs = _completion_logprobs(reply, tokenizer, f, range(j, j + 1))
            ids = _token_ids(reply, f.tokens[j : j + 1])
            if piece or logprobs is not None or ids:
                events.append(_text_chunk(reply, index, piece, logprobs, None, {**prompt, **ids}))
                prompt = {}
        events.append(_text_chunk(reply, index, "", None, f.reason, prompt))
    if with_usage:
        chunk = {**_head(reply, "text_completion"), "choices": []}
        events.append(sse({**chunk, "usage": usage(reply.prompt_tokens, finished)}))
    return [*events, sse("[DONE]")]


def _text_chunk(
    reply: Reply,
    index: int,
    text: str,
    logprobs: dict[str, Any] | None,
    reason: str | None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    return sse({**_head(reply, "text_completion"), "choices": [{**choice, **(extra or {})}]})


def _completion_logprobs(
    reply: Reply, tokenizer: Any, f: Finished, positions: range
) -> dict[str, Any] | None:
    """The legacy logprobs object for the tokens at `positions`."""
    if reply.logprobs is None:
        return None
    offsets = [sum(len(p) for p in f.pieces[:i]) for i in positions]
    logprobs = f.logprobs or []

    def name(token: int) -> str:
        return token_text(tokenizer, token, reply.token_ids)

    top = [{name(t): lp for t, lp in _top(f, i, reply.logprobs)} for i in positions]
    return {
        "tokens": [name(f.tokens[i]) for i in positions],
        "token_logprobs": [logprobs[i] for i in positions if i < len(logprobs)],
        "top_logprobs": top if reply.logprobs > 0 else None,
        "text_offset": offsets,
    }


def models_body(names: list[tuple[str, int]]) -> dict[str, Any]:
    """The `GET /models` list: (model id, created time) pairs."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "engineroom"}
            for name, created in names
        ],
    }


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object."""
    kind, code = {
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "model_not_found"),
        429: ("rate_limit_error", "rate_limit_exceeded"),
    }.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "Reply",
    "chat_body",
    "chat_events",
    "chat_logprobs",
    "chat_messages",
    "chat_params",
    "chat_tools",
    "check",
    "completion_body",
    "completion_events",
    "completion_params",
    "completion_prompts",
    "error_body",
    "message_text",
    "models_body",
    "usage",
]
