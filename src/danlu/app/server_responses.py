"""What `danlu serve` answers: OpenAI's response bodies, its server-sent events, and the whole
texts of replies read while watching for a client that left."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from danlu.app.server_requests import APIError

DISCONNECT_POLL_S = 0.2  # how often a non-streamed request checks that its client is still there


def _logprob(token: str, value: float) -> dict:
    return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}


def logprobs_object(kind: str, entries: list, offset: int = 0) -> dict:
    """OpenAI's logprobs object for ``entries`` (chat: ``content`` list; text: parallel lists)."""
    if kind == "chat":
        content = [
            {**_logprob(e.token, e.logprob), "top_logprobs": [_logprob(t, v) for t, _, v in e.top]}
            for e in entries
        ]
        return {"content": content, "refusal": None}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: v for t, _, v in e.top} for e in entries],
        "text_offset": offsets,
    }


def one_choice(kind: str, i: int, gen: Any, text: str, tools: list | None, logprobs: bool) -> dict:
    """One whole choice of a non-streamed response."""
    from danlu.infer import tool_calls

    choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": gen.finish_reason}
    if logprobs:
        choice["logprobs"] = logprobs_object(kind, gen.logprobs)
    if kind != "chat":
        choice["text"] = text
        return choice
    message: dict[str, Any] = {"role": "assistant", "content": text}
    content, calls = tool_calls(text, tools) if tools else (text, [])
    if calls:
        message["content"] = content
        message["tool_calls"] = [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": c} for c in calls
        ]
        choice["finish_reason"] = "tool_calls"
    choice["message"] = message
    return choice


def usage(gens: list) -> dict:
    completion = sum(g.completion_tokens for g in gens)
    prompt = gens[0].prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def body(kind: str, rid: str, model: str, gens: list, texts: list[str], tools: Any, lp: bool) -> dict:
    """A whole (non-streamed) chat.completion or text_completion response."""
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            one_choice(kind, i, g, t, tools, lp) for i, (g, t) in enumerate(zip(gens, texts, strict=True))
        ],
        "usage": usage(gens),
    }


async def events(
    kind: str, rid: str, model: str, gens: list, include_usage: bool, tools: Any, lp: bool
) -> AsyncIterator[str]:
    """Server-sent events exactly as OpenAI streams them, ending with ``data: [DONE]``.

    With tools, each choice's text is held to the end, then sent as tool calls or as text.
    """
    from danlu.infer import merged

    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(i: int, delta: dict | str, finish: str | None, logprobs: dict | None = None) -> str:
        choice: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": finish}
        choice["delta" if kind == "chat" else "text"] = delta
        data = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    held = [""] * len(gens)
    offsets = [0] * len(gens)
    try:
        if kind == "chat":
            for i in range(len(gens)):
                yield chunk(i, {"role": "assistant", "content": ""}, None)
        async for i, delta in merged(gens):
            if delta is not None:
                if tools:
                    held[i] += delta.text
                    continue
                logprobs = logprobs_object(kind, delta.logprobs, offsets[i]) if lp else None
                offsets[i] += len(delta.text)
                if delta.text or logprobs:
                    yield chunk(i, {"content": delta.text} if kind == "chat" else delta.text, None, logprobs)
                continue
            gen = gens[i]
            if tools:
                whole = one_choice(kind, i, gen, held[i], tools, lp)
                message = whole["message"]
                if message.get("tool_calls"):
                    calls = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
                    yield chunk(i, {"content": message["content"], "tool_calls": calls}, None)
                else:
                    yield chunk(i, {"content": held[i]}, None, whole["logprobs"])
                yield chunk(i, {}, whole["finish_reason"])
            else:
                yield chunk(i, {} if kind == "chat" else "", gen.finish_reason)
        if include_usage:
            head = {"id": rid, "object": obj, "created": created, "model": model, "choices": []}
            yield f"data: {json.dumps({**head, 'usage': usage(gens)})}\n\n"
    except Exception as e:  # noqa: BLE001 - headers are gone already: report inside the stream, as OpenAI does
        yield f"data: {json.dumps(APIError(500, f'generation failed: {e}').body())}\n\n"
    yield "data: [DONE]\n\n"


async def collect(gens: list, request: Any) -> list[str] | None:
    """Every reply's whole text, or None when the client left first (the replies are stopped)."""
    texts = [""] * len(gens)

    from danlu.infer import merged

    async def read() -> None:
        async for i, delta in merged(gens):
            if delta is not None:
                texts[i] += delta.text

    task = asyncio.create_task(read())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                task.result()
                return texts
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()
        for g in gens:
            g.stop() if not g.finished else None
