"""`danlu serve`: an OpenAI-compatible HTTP API over :class:`danlu.infer.Engine` (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain or streamed as
server-sent events, exactly as OpenAI sends them), ``GET /v1/models``, ``GET /health``.
The request's ``model`` picks the base (its name as given to ``--model``) or an adapter
(``--adapter NAME=DIR``). Concurrent requests are decoded together by the engine; a client that
hangs up (streamed or not) stops its reply at the next step. Errors come back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for anything wrong in a request.

fastapi, pydantic and uvicorn are imported inside functions so that ``danlu --help`` works
without the ``serve`` extra. (No ``from __future__ import annotations`` here: FastAPI reads the
route signatures' annotations at runtime.)
"""

import argparse
import asyncio
import functools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from danlu.app.common import (
    add_generation_flags,
    add_loading_flags,
    loading_options,
    model_for,
    port_free,
    settings_from,
    trust_remote_code,
)
from danlu.config import DEFAULT_MODEL
from danlu.errors import UserError

MAX_BODY = 1 << 20  # bytes; larger requests get 413 before any parsing
MAX_N = 16  # choices per request
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
DISCONNECT_POLL_S = 0.2  # how often a non-streamed request checks that its client is still there


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = {429: "rate_limit_error", 401: "authentication_error"}.get(
            self.status, "invalid_request_error"
        )
        kind = "server_error" if self.status >= 500 else kind
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@functools.cache
def _schemas() -> SimpleNamespace:
    """Request bodies (pydantic); unknown fields are ignored, as OpenAI-compatible servers do."""
    from pydantic import BaseModel, ConfigDict, Field

    class Sampling(BaseModel):
        model_config = ConfigDict(allow_inf_nan=False)
        model: str
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0)
        repetition_penalty: float | None = Field(None, gt=0, le=10)
        presence_penalty: float | None = Field(None, ge=-2, le=2)
        frequency_penalty: float | None = Field(None, ge=-2, le=2)
        logit_bias: dict[str, float] | None = None
        seed: int | None = Field(None, ge=-(2**63), lt=2**63)
        n: int = Field(1, ge=1, le=MAX_N)
        stop: str | list[str] | None = None
        user: str | None = None

    class Message(BaseModel):
        role: str
        content: str | list[dict[str, Any]] | None = None
        name: str | None = None
        tool_calls: list[dict[str, Any]] | None = None
        tool_call_id: str | None = None

    class Chat(Sampling):
        messages: list[Message]
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool | None = None
        top_logprobs: int | None = Field(None, ge=0, le=20)
        response_format: dict[str, Any] | None = None
        tools: list[dict[str, Any]] | None = None
        tool_choice: str | dict[str, Any] | None = None
        parallel_tool_calls: bool | None = None

    class Completion(Sampling):
        prompt: str | list[str]
        logprobs: int | None = Field(None, ge=0, le=5)
        echo: bool = False
        suffix: str | None = None
        best_of: int | None = Field(None, ge=1)

    return SimpleNamespace(Chat=Chat, Completion=Completion)


def _text_of(content: str | list[dict[str, Any]] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", f"messages[{i}].content")
        parts.append(part["text"])
    return "".join(parts)


def _assistant_calls(calls: list[dict], i: int) -> list[dict]:
    """OpenAI's ``tool_calls`` (arguments as JSON text) as chat templates take them (a dict)."""
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        where = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, "a tool call needs function.name", where)
        args = fn.get("arguments") or "{}"
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise APIError(400, "function.arguments is not valid JSON", where) from None
        out.append(
            {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}
        )
    return out


def _logprob(token: str, value: float) -> dict:
    return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}


class Service:
    """What the routes call: model lookup, request → settings, and response bodies.

    ``defaults`` come from the sampling flags; their ``max_new_tokens`` is also the most a
    request gets (a larger ``max_tokens`` is cut to it, said in the ``danlu-max-tokens`` header).
    """

    def __init__(self, engine: Any, base_name: str, defaults: Any) -> None:
        self.engine = engine
        self.base_name = base_name
        self.defaults = defaults
        self.limit = defaults.max_new_tokens
        self.created = int(time.time())
        self.names: dict[str, str | None] = {base_name: None}
        for name in engine.adapter_names:
            self.names[name] = name
        # the paths they were loaded from also work as model names
        self.aliases = dict(self.names)
        self.aliases[engine.model_ref] = None
        for name, path in engine.adapter_dirs.items():
            self.aliases.setdefault(path, name)

    def models(self) -> dict:
        data = [
            {"id": n, "object": "model", "created": self.created, "owned_by": "danlu"} for n in self.names
        ]
        return {"object": "list", "data": data}

    def pick(self, name: str) -> str | None:
        if name not in self.aliases:
            known = ", ".join(self.names)
            raise APIError(
                404, f"The model '{name}' does not exist; served: {known}", "model", "model_not_found"
            )
        return self.aliases[name]

    def settings(self, req: Any, kind: str) -> tuple[Any, bool]:
        """The request's sampling settings, and whether it asked for more tokens than the limit."""
        asked = (req.max_completion_tokens or req.max_tokens) if kind == "chat" else req.max_tokens
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop takes at most 4 sequences", "stop")
        bias: dict[int, float] = {}
        for key, value in (req.logit_bias or {}).items():
            vocab = getattr(self.engine, "vocab_size", None)
            if not key.strip().isdigit() or not -100 <= value <= 100 or (vocab and int(key) >= vocab):
                raise APIError(
                    400, f"logit_bias maps token ids (below {vocab}) to values from -100 to 100", "logit_bias"
                )
            bias[int(key)] = value
        if kind == "chat":
            if req.top_logprobs is not None and not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        given = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "repetition_penalty": req.repetition_penalty,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "seed": req.seed,
        }
        settings = replace(
            self.defaults,
            **{k: v for k, v in given.items() if v is not None},
            max_new_tokens=min(asked or self.limit, self.limit),
            stop=tuple(s for s in stop if s),
            logit_bias=bias or None,
            logprobs=logprobs,
        )
        return settings, asked is not None and asked > self.limit

    def messages(self, req: Any) -> list[dict]:
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", "messages")
        out = []
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise APIError(
                    400, f"role '{m.role}' is not one of {', '.join(ROLES)}", f"messages[{i}].role"
                )
            message: dict[str, Any] = {"role": ROLES[m.role], "content": _text_of(m.content, i)}
            if m.tool_calls:
                message["tool_calls"] = _assistant_calls(m.tool_calls, i)
            if m.role == "tool":
                message.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name)) if v})
            out.append(message)
        return out

    def tools(self, req: Any) -> list[dict] | None:
        """The tools to put into the template, or a 400 for what cannot be honoured."""
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise APIError(
                400,
                f"response_format {fmt} is not supported: the output cannot be constrained to JSON here; "
                "ask for JSON in the prompt instead",
                "response_format",
                "unsupported_parameter",
            )
        choice = req.tool_choice
        if not req.tools or choice == "none":
            return None
        if choice not in (None, "auto"):
            raise APIError(
                400,
                "tool_choice can be 'auto' or 'none': the model cannot be forced to call a tool here",
                "tool_choice",
                "unsupported_parameter",
            )
        for i, tool in enumerate(req.tools):
            fn = tool.get("function")
            if (
                tool.get("type") != "function"
                or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)
            ):
                raise APIError(
                    400, "each tool must be {type: function, function: {name, ...}}", f"tools[{i}]"
                )
        return req.tools

    def prompt(self, req: Any) -> str:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be one string (batches are not supported)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        for field, bad in (("echo", req.echo), ("suffix", req.suffix), ("best_of", (req.best_of or 1) > 1)):
            if bad:
                raise APIError(400, f"{field} is not supported", field, "unsupported_parameter")
        return prompt

    # ------------------------------------------------------------------ response bodies

    def logprobs(self, kind: str, entries: list, offset: int = 0) -> dict:
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

    def choice(self, kind: str, i: int, gen: Any, text: str, tools: list | None, logprobs: bool) -> dict:
        """One whole choice of a non-streamed response."""
        from danlu.infer import tool_calls

        choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": gen.finish_reason}
        if logprobs:
            choice["logprobs"] = self.logprobs(kind, gen.logprobs)
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

    @staticmethod
    def usage(gens: list) -> dict:
        completion = sum(g.completion_tokens for g in gens)
        prompt = gens[0].prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def body(
        self, kind: str, rid: str, model: str, gens: list, texts: list[str], tools: Any, lp: bool
    ) -> dict:
        """A whole (non-streamed) chat.completion or text_completion response."""
        return {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                self.choice(kind, i, g, t, tools, lp)
                for i, (g, t) in enumerate(zip(gens, texts, strict=True))
            ],
            "usage": self.usage(gens),
        }

    async def events(
        self, kind: str, rid: str, model: str, gens: list, usage: bool, tools: Any, lp: bool
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
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

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
                    logprobs = self.logprobs(kind, delta.logprobs, offsets[i]) if lp else None
                    offsets[i] += len(delta.text)
                    if delta.text or logprobs:
                        yield chunk(
                            i, {"content": delta.text} if kind == "chat" else delta.text, None, logprobs
                        )
                    continue
                gen = gens[i]
                if tools:
                    whole = self.choice(kind, i, gen, held[i], tools, lp)
                    message = whole["message"]
                    if message.get("tool_calls"):
                        calls = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
                        yield chunk(i, {"content": message["content"], "tool_calls": calls}, None)
                    else:
                        yield chunk(i, {"content": held[i]}, None, whole["logprobs"])
                    yield chunk(i, {}, whole["finish_reason"])
                else:
                    yield chunk(i, {} if kind == "chat" else "", gen.finish_reason)
            if usage:
                body = {"id": rid, "object": obj, "created": created, "model": model, "choices": []}
                yield f"data: {json.dumps({**body, 'usage': self.usage(gens)})}\n\n"
        except Exception as e:  # noqa: BLE001 - headers are gone already: report inside the stream, as OpenAI does
            yield f"data: {json.dumps(APIError(500, f'generation failed: {e}').body())}\n\n"
        yield "data: [DONE]\n\n"


async def _collect(gens: list, request: Any) -> list[str] | None:
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


class Guard:
    """ASGI middleware: API key on ``/v1`` (401), then a body-size cap (413) before any parsing."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    def authorized(self, headers: dict) -> bool:
        """Whether the request carries the key (``Authorization: Bearer KEY``, the scheme in any case)."""
        if not self.api_key:
            return True
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scope.setdefault("state", {})["authorized"] = self.authorized(headers)
        if self.api_key and scope["path"].startswith("/v1"):
            if not scope["state"]["authorized"]:
                err = APIError(
                    401, "Incorrect or missing API key (Authorization: Bearer KEY)", None, "invalid_api_key"
                )
                return await JSONResponse(err.body(), 401)(scope, receive, send)
        too_big = APIError(413, f"request body over {self.max_body} bytes", None, "request_too_large")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await JSONResponse(too_big.body(), 413)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # chunked bodies carry no length: count while reading
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await JSONResponse(too_big.body(), 413)(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(service: Service, api_key: str | None = None, max_body: int = MAX_BODY) -> Any:
    """The FastAPI application; every route is a thin call into ``service``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from danlu.infer import Busy, RequestError

    app = FastAPI(title="danlu", docs_url=None, redoc_url=None)
    schemas = _schemas()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation(exc.errors()).body(), 400)

    async def parse(request: Request, schema: Any) -> Any:
        try:
            data = json.loads(await request.body())
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer of 4,300+ digits
            said = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
            raise APIError(400, f"request body is not valid JSON: {said}", None, "invalid_json") from None
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _validation(e.errors()) from None
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", None, "invalid_json") from None

    def start(kind: str, req: Any, what: Any, settings: Any, asked: int | None, tools: Any) -> list:
        """Queue the request's n replies with the engine (in a worker thread: templates take time)."""
        adapter = service.pick(req.model)
        gens: list = []
        try:
            for i in range(req.n):
                s = settings if settings.seed is None or i == 0 else replace(settings, seed=settings.seed + i)
                if kind == "chat":
                    gens.append(service.engine.chat(what, s, adapter, tools, asked))
                else:
                    gens.append(service.engine.complete(what, s, adapter, asked))
        except Busy as e:
            raise APIError(
                429, str(e), None, "rate_limit_exceeded", {"Retry-After": str(e.retry_after)}
            ) from None
        except RequestError as e:
            raise APIError(400, str(e), e.param, e.code) from None
        except UserError as e:
            raise APIError(400, str(e), None, "invalid_value") from None
        finally:
            if len(gens) < req.n:  # a later choice was refused: the earlier ones are not wanted
                for g in gens:
                    g.stop()
        return gens

    async def answer(kind: str, request: Request, req: Any) -> Any:
        service.pick(req.model)
        tools = service.tools(req) if kind == "chat" else None
        what = service.messages(req) if kind == "chat" else service.prompt(req)
        settings, clamped = service.settings(req, kind)
        asked = (req.max_completion_tokens or req.max_tokens) if kind == "chat" else req.max_tokens
        gens = await run_in_threadpool(start, kind, req, what, settings, asked, tools)
        headers = {"danlu-max-tokens": str(service.limit)} if clamped else None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        lp = settings.logprobs is not None
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            events = service.events(kind, rid, req.model, gens, usage, tools, lp)
            # a client gone before the first event never starts the stream: stop its replies after
            stop_all = BackgroundTask(lambda: [g.stop() for g in gens if not g.finished])
            return StreamingResponse(
                events, media_type="text/event-stream", headers=headers, background=stop_all
            )
        try:
            texts = await _collect(gens, request)
        except Exception as e:  # noqa: BLE001 - the model failed: a 500 in OpenAI's shape
            raise APIError(500, f"generation failed: {e}") from None
        if texts is None:  # the client left: nobody reads this
            return Response(status_code=499)
        return JSONResponse(service.body(kind, rid, req.model, gens, texts, tools, lp), headers=headers)

    @app.get("/health")
    async def health(request: Request) -> dict:
        if not request.state.authorized:  # without the key: only that it is up
            return {"status": "ok"}
        return {"status": "ok", "models": list(service.names)}

    @app.get("/v1/models")
    async def models() -> dict:
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await answer("chat", request, await parse(request, schemas.Chat))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer("text", request, await parse(request, schemas.Completion))

    return Guard(app, api_key, max_body)


def _param(loc: Any) -> str | None:
    """A pydantic error location as OpenAI names parameters: ``messages[0].role``."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x == "body" and not out:
            continue
        elif not str(x).isidentifier() or str(x) in TYPE_NAMES:  # a union member's type, not a field
            break
        else:
            out += f".{x}" if out else str(x)
    return out or None


TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation(errors: Any) -> APIError:
    """FastAPI/pydantic validation errors as one OpenAI-style 400 naming the parameter."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "request body is not valid JSON", None, "invalid_json")
    parts = [f"{_param(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors]
    param = _param(errors[0].get("loc", ())) if errors else None
    return APIError(400, "; ".join(dict.fromkeys(parts))[:500], param, "invalid_value")


# ------------------------------------------------------------------------------ CLI


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` (named by its path) → ``{name: dir}``; folders must exist."""
    out: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (spec, "", spec)
        if not name or not path:
            raise UserError(f"--adapter {spec}: give NAME=DIR or DIR")
        if not Path(path).is_dir():
            raise UserError(f"--adapter {path}: no such folder; point it at OUTPUT/final of a run")
        if name in out:
            raise UserError(f"--adapter {spec}: the name '{name}' is used twice")
        out[name] = path
    return out


def build_service(args: argparse.Namespace) -> Service:
    """Load the engine the CLI flags describe and wrap it for the routes."""
    from danlu.infer import Engine

    adapters = parse_adapters(args.adapter or [])
    first = next(iter(adapters.values()), None)
    model = model_for(args, first)
    trust = trust_remote_code(args, model, first)
    batch = {"max_batch": getattr(args, "max_batch", 32), "max_waiting": getattr(args, "max_waiting", 256)}
    engine = Engine(model, adapters=adapters, trust_remote_code=trust, **loading_options(args), **batch)
    return Service(engine, model, settings_from(args))


def api_key(args: argparse.Namespace) -> str | None:
    """The key clients must send: ``--api-key-file`` (kept out of ``ps``), ``--api-key``, else
    the ``DANLU_API_KEY`` environment variable."""
    import os

    if getattr(args, "api_key_file", None):
        path = Path(args.api_key_file)
        if not path.is_file():
            raise UserError(f"--api-key-file {path}: no such file")
        key = path.read_text(encoding="utf-8").strip()
        if not key:
            raise UserError(f"--api-key-file {path}: the file is empty")
        return key
    return getattr(args, "api_key", None) or os.environ.get("DANLU_API_KEY") or None


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("danlu serve needs fastapi and uvicorn: pip install 'danlu[serve]'") from None
    if not port_free(args.host, args.port):
        raise UserError(f"--port {args.port}: {args.host}:{args.port} is in use; pick another port")
    for flag, value in (("--max-batch", args.max_batch), ("--max-waiting", args.max_waiting)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    key = api_key(args)
    service = build_service(args)
    app = create_app(service, key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it")
    print(f"danlu serve — models: {', '.join(service.names)}")
    print(f"OpenAI-compatible API at http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        service.engine.shutdown()
    return 0


def add_parser(sub: Any) -> None:
    """Register `danlu serve` on the CLI's subparsers."""
    p = sub.add_parser(
        "serve",
        help="serve a model (and adapters) over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, "
        "GET /health. The request's `model` picks the base or an adapter by name. Concurrent requests are "
        "decoded together.",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"alias, folder or hub id (default: the adapter's base, else {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="LoRA adapter folder; repeat for several over one base",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1 routes (also: DANLU_API_KEY, --api-key-file)",
    )
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="read the key from a file")
    p.add_argument("--max-batch", type=int, default=32, help="replies decoded together (default 32)")
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests queued beyond those; more get 429 (default 256)",
    )
    add_loading_flags(p)
    add_generation_flags(p, api=True)
    p.set_defaults(func=run_serve)
