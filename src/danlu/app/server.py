"""`danlu serve`: an OpenAI-compatible HTTP API over :class:`danlu.infer.Engine` (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain or streamed as
server-sent events, exactly as OpenAI sends them), ``GET /v1/models``, ``GET /health``.
The request's ``model`` picks the base (its name as given to ``--model``) or an adapter
(``--adapter NAME=DIR``). Errors come back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the matching status.

fastapi, pydantic and uvicorn are imported inside functions so that ``danlu --help`` works
without the ``serve`` extra. (No ``from __future__ import annotations`` here: FastAPI reads the
route signatures' annotations at runtime.)
"""

import argparse
import functools
import json
import secrets
import time
import uuid
from collections.abc import Iterator
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
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@functools.cache
def _schemas() -> SimpleNamespace:
    """Request bodies (pydantic); unknown fields are ignored, as OpenAI-compatible servers do."""
    from pydantic import BaseModel, Field

    class Sampling(BaseModel):
        model: str
        stream: bool = False
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0)
        repetition_penalty: float | None = Field(None, gt=0)
        seed: int | None = None
        n: int = Field(1, ge=1)
        stream_options: dict[str, Any] | None = None

    class Message(BaseModel):
        role: str
        content: str | list[dict[str, Any]] | None = None

    class Chat(Sampling):
        messages: list[Message]
        max_completion_tokens: int | None = Field(None, ge=1)

    class Completion(Sampling):
        prompt: str | list[str]

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


class Service:
    """What the routes call: model lookup, request → settings, and response bodies."""

    def __init__(self, engine: Any, base_name: str, defaults: Any, max_tokens: int = 4096) -> None:
        self.engine = engine
        self.base_name = base_name
        self.defaults = defaults
        self.max_tokens = max_tokens
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

    def settings(self, req: Any, max_tokens: int | None) -> Any:
        from dataclasses import replace

        if req.n != 1:
            raise APIError(400, "n must be 1: one choice per request", "n")
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise APIError(400, f"max_tokens must be at most {self.max_tokens}", "max_tokens")
        given = {
            "max_new_tokens": max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "repetition_penalty": req.repetition_penalty,
            "seed": req.seed,
        }
        return replace(self.defaults, **{k: v for k, v in given.items() if v is not None})

    def messages(self, req: Any) -> list[dict]:
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", "messages")
        out = []
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise APIError(
                    400, f"role '{m.role}' is not one of {', '.join(ROLES)}", f"messages[{i}].role"
                )
            out.append({"role": ROLES[m.role], "content": _text_of(m.content, i)})
        return out

    def prompt(self, req: Any) -> str:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be one string (batches are not supported)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        return prompt

    def body(self, kind: str, rid: str, model: str, gen: Any, text: str) -> dict:
        """A whole (non-streamed) chat.completion or text_completion response."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": gen.finish_reason}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        usage = {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        }
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }

    def events(self, kind: str, rid: str, model: str, gen: Any, usage: bool) -> Iterator[str]:
        """Server-sent events exactly as OpenAI streams them, ending with ``data: [DONE]``."""
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict | str, finish: str | None) -> str:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            choice["delta" if kind == "chat" else "text"] = delta
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""}, None)
            for piece in gen:
                if piece:
                    yield chunk({"content": piece} if kind == "chat" else piece, None)
            yield chunk({} if kind == "chat" else "", gen.finish_reason)
            if usage:
                counts = self.body(kind, rid, model, gen, "")["usage"]
                body = {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": counts,
                }
                yield f"data: {json.dumps(body)}\n\n"
        except Exception as e:  # headers are gone already: report inside the stream, as OpenAI does
            yield f"data: {json.dumps(APIError(500, f'generation failed: {e}').body())}\n\n"
        finally:
            gen.pieces.close()
        yield "data: [DONE]\n\n"


class Guard:
    """ASGI middleware: API key on ``/v1`` (401), then a body-size cap (413) before any parsing."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
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
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="danlu", docs_url=None, redoc_url=None)
    schemas = _schemas()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation(exc.errors()).body(), 422)

    async def parse(request: Request, schema: Any) -> Any:
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _validation(e.errors()) from None

    async def answer(kind: str, req: Any, gen: Any) -> Any:
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            events = service.events(kind, rid, req.model, gen, usage)

            async def sse() -> Any:
                try:
                    async for event in iterate_in_threadpool(events):
                        yield event
                finally:  # the client went away (or we are done): free the model for the next request
                    gen.stop()

            return StreamingResponse(sse(), media_type="text/event-stream")
        try:
            text = await run_in_threadpool(gen.text)
        except Exception as e:
            raise APIError(500, f"generation failed: {e}") from None
        return service.body(kind, rid, req.model, gen, text)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(service.names)}

    @app.get("/v1/models")
    async def models() -> dict:
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = await parse(request, schemas.Chat)
        adapter = service.pick(req.model)
        settings = service.settings(req, req.max_completion_tokens or req.max_tokens)
        messages = service.messages(req)
        try:
            gen = service.engine.chat(messages, settings, adapter)
        except Exception as e:  # the chat template refused the conversation (e.g. roles out of order)
            raise APIError(
                400, f"the model's chat template cannot render these messages: {e}", "messages"
            ) from None
        return await answer("chat", req, gen)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await parse(request, schemas.Completion)
        adapter = service.pick(req.model)
        settings = service.settings(req, req.max_tokens)
        return await answer("text", req, service.engine.complete(service.prompt(req), settings, adapter))

    return Guard(app, api_key, max_body)


def _validation(errors: Any) -> APIError:
    """FastAPI/pydantic validation errors as one OpenAI-style 422."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "request body is not valid JSON")
    parts, params = [], []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        params.append(".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return APIError(422, "; ".join(parts), params[0] if params else None, "invalid_value")


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
    engine = Engine(model, adapters=adapters, trust_remote_code=trust, **loading_options(args))
    return Service(engine, model, settings_from(args))


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("danlu serve needs fastapi and uvicorn: pip install 'danlu[serve]'") from None
    if not port_free(args.host, args.port):
        raise UserError(f"--port {args.port}: {args.host}:{args.port} is in use; pick another port")
    service = build_service(args)
    app = create_app(service, args.api_key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it")
    print(f"danlu serve — models: {', '.join(service.names)}")
    print(f"OpenAI-compatible API at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def add_parser(sub: Any) -> None:
    """Register `danlu serve` on the CLI's subparsers."""
    p = sub.add_parser(
        "serve",
        help="serve a model (and adapters) over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, "
        "GET /health. The request's `model` picks the base or an adapter by name.",
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
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    add_loading_flags(p)
    add_generation_flags(p)
    p.set_defaults(func=run_serve)
