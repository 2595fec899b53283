"""What `danlu serve` answers: OpenAI's response bodies, its server-sent events (reasoning apart
from the answer, tool calls parsed), and the whole texts of replies read while watching for a
client that left."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
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


@dataclass
class Reply:
    """What shapes a response: its kind (``chat`` or ``text``), id, model name, the request's tools,
    whether logprobs were asked for, and how reasoning is given back: ``separate`` (a chat
    message's ``reasoning_content``), ``hidden`` (dropped) or ``raw`` (left in the content)."""

    kind: str
    rid: str
    model: str
    tools: list | None = None
    logprobs: bool = False
    reasoning: str = "separate"


def split(reply: Reply, gen: Any, text: str) -> tuple[str | None, str]:
    """A chat reply's ``(reasoning, content)`` as ``reply.reasoning`` asks (reasoning None: none given)."""
    from danlu.infer.reasoning import split_reasoning

    if reply.kind != "chat" or reply.reasoning == "raw":
        return None, text
    reasoning, content = split_reasoning(text, getattr(gen, "reasoning_open", False))
    return (reasoning if reply.reasoning == "separate" else None), content


def one_choice(reply: Reply, i: int, gen: Any, text: str) -> dict:
    """One whole choice of a non-streamed response."""
    from danlu.infer import tool_calls

    choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": gen.finish_reason}
    if reply.logprobs:
        choice["logprobs"] = logprobs_object(reply.kind, gen.logprobs)
    if reply.kind != "chat":
        choice["text"] = text
        return choice
    reasoning, text = split(reply, gen, text)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    content, calls = tool_calls(text, reply.tools) if reply.tools else (text, [])
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


def body(reply: Reply, gens: list, texts: list[str]) -> dict:
    """A whole (non-streamed) chat.completion or text_completion response."""
    return {
        "id": reply.rid,
        "object": "chat.completion" if reply.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [one_choice(reply, i, g, t) for i, (g, t) in enumerate(zip(gens, texts, strict=True))],
        "usage": usage(gens),
    }


async def events(reply: Reply, gens: list, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events exactly as OpenAI streams them, ending with ``data: [DONE]``.

    Reasoning comes as ``reasoning_content`` deltas (or not at all), the answer as ``content``.
    With tools, each choice's text is held to the end, then sent as tool calls or as text.
    """
    from danlu.infer import merged
    from danlu.infer.reasoning import ReasoningSplitter

    kind, created = reply.kind, int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(i: int, delta: dict | str, finish: str | None, logprobs: dict | None = None) -> str:
        choice: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": finish}
        choice["delta" if kind == "chat" else "text"] = delta
        data = {"id": reply.rid, "object": obj, "created": created, "model": reply.model, "choices": [choice]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    splitting = kind == "chat" and reply.reasoning != "raw"
    splitters = [ReasoningSplitter(getattr(g, "reasoning_open", False)) for g in gens]
    held = [""] * len(gens)
    offsets = [0] * len(gens)

    def pieces(i: int, text: str, end: bool = False) -> dict | str:
        """The delta for ``text`` of choice ``i``: reasoning and content apart (or as they came)."""
        if kind != "chat":
            return text
        if not splitting:
            return {"content": text} if text else {}
        reasoning, content = splitters[i].feed(text)
        if end:
            more = splitters[i].flush()
            reasoning, content = reasoning + more[0], content + more[1]
        out = {"reasoning_content": reasoning} if reasoning and reply.reasoning == "separate" else {}
        return {**out, "content": content} if content else out

    try:
        if kind == "chat":
            for i in range(len(gens)):
                yield chunk(i, {"role": "assistant", "content": ""}, None)
        async for i, delta in merged(gens):
            if delta is not None:
                if reply.tools:
                    held[i] += delta.text
                    continue
                logprobs = logprobs_object(kind, delta.logprobs, offsets[i]) if reply.logprobs else None
                offsets[i] += len(delta.text)
                d = pieces(i, delta.text)
                if d or logprobs:
                    yield chunk(i, d or ({"content": ""} if kind == "chat" else ""), None, logprobs)
                continue
            gen = gens[i]
            if reply.tools:
                whole = one_choice(reply, i, gen, held[i])
                message = whole["message"]
                first = {k: message[k] for k in ("reasoning_content",) if k in message}
                if message.get("tool_calls"):
                    calls = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
                    yield chunk(i, {**first, "content": message["content"], "tool_calls": calls}, None)
                else:
                    yield chunk(i, {**first, "content": message["content"]}, None, whole["logprobs"])
                yield chunk(i, {}, whole["finish_reason"])
            else:
                rest = pieces(i, "", end=True)
                if rest:
                    yield chunk(i, rest, None)
                yield chunk(i, {} if kind == "chat" else "", gen.finish_reason)
        if include_usage:
            head = {"id": reply.rid, "object": obj, "created": created, "model": reply.model, "choices": []}
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
