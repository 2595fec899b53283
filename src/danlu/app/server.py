"""`danlu serve`: an OpenAI-compatible HTTP API over :class:`danlu.infer.Engine` (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain or streamed as
server-sent events, exactly as OpenAI sends them), ``GET /v1/models``, ``GET /health``.
The request's ``model`` picks the base (its name as given to ``--model``) or an adapter
(``--adapter NAME=DIR``). Concurrent requests are decoded together by the engine; a client that
hangs up (streamed or not) stops its reply at the next step. Errors come back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for anything wrong in a request.
What a request means is :mod:`danlu.app.server_requests`; what is answered,
:mod:`danlu.app.server_responses`; here: the routes, the key and body-size guard, and the verb.

fastapi, pydantic and uvicorn are imported inside functions so that ``danlu --help`` works
without the ``serve`` extra. (No ``from __future__ import annotations`` here: FastAPI reads the
route signatures' annotations at runtime.)
"""

import argparse
import secrets
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from danlu.app import server_requests as rq
from danlu.app import server_responses as rs
from danlu.app.common import (
    add_generation_flags,
    add_loading_flags,
    add_thinking_flag,
    exposure_warning,
    loading_options,
    model_for,
    port_free,
    read_secret,
    settings_from,
    template_kwargs,
    trust_remote_code,
)
from danlu.app.server_requests import APIError
from danlu.config import DEFAULT_MODEL
from danlu.errors import UserError

MAX_BODY = 1 << 20  # bytes; larger requests get 413 before any parsing


class Service:
    """What the routes share: the served models by name, the sampling defaults and the token limit.

    ``defaults`` come from the sampling flags; their ``max_new_tokens`` is also the most a
    request gets (a larger ``max_tokens`` is cut to it, said in the ``danlu-max-tokens`` header).
    """

    def __init__(
        self,
        engine: Any,
        base_name: str,
        defaults: Any,
        reasoning: str = "separate",
        template_kwargs: dict | None = None,
    ) -> None:
        self.engine = engine
        self.reasoning = reasoning  # how replies give back a <think> block (server_responses.Reply)
        self.template_kwargs = template_kwargs  # the chat template's defaults; a request's own win
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
        return rq.settings(req, kind, self.defaults, getattr(self.engine, "vocab_size", None))


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
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from danlu.infer import Busy, RequestError

    app = FastAPI(title="danlu", docs_url=None, redoc_url=None)
    schemas = rq.schemas()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(rq.validation_error(exc.errors()).body(), 400)

    def start(kind: str, req: Any, what: Any, settings: Any, asked: int | None, tools: Any) -> list:
        """Queue the request's n replies with the engine (in a worker thread: templates take time)."""
        adapter = service.pick(req.model)
        gens: list = []
        try:
            for i in range(req.n):
                s = settings if settings.seed is None or i == 0 else replace(settings, seed=settings.seed + i)
                if kind == "chat":
                    kwargs = {**(service.template_kwargs or {}), **(req.chat_template_kwargs or {})} or None
                    gens.append(service.engine.chat(what, s, adapter, tools, asked, template_kwargs=kwargs))
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
        tools = rq.tools(req) if kind == "chat" else None
        what = rq.messages(req) if kind == "chat" else rq.prompt(req)
        settings, clamped = service.settings(req, kind)
        asked = (req.max_completion_tokens or req.max_tokens) if kind == "chat" else req.max_tokens
        gens = await run_in_threadpool(start, kind, req, what, settings, asked, tools)
        headers = {"danlu-max-tokens": str(service.limit)} if clamped else None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        lp = settings.logprobs is not None
        reply = rs.Reply(kind, rid, req.model, tools, lp, service.reasoning)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            events = rs.events(reply, gens, usage)
            # a client gone before the first event never starts the stream: stop its replies after
            stop_all = BackgroundTask(lambda: [g.stop() for g in gens if not g.finished])
            return StreamingResponse(
                events, media_type="text/event-stream", headers=headers, background=stop_all
            )
        try:
            texts = await rs.collect(gens, request)
        except Exception as e:  # noqa: BLE001 - the model failed: a 500 in OpenAI's shape
            raise APIError(500, f"generation failed: {e}") from None
        if texts is None:  # the client left: nobody reads this
            return Response(status_code=499)
        return JSONResponse(rs.body(reply, gens, texts), headers=headers)

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
        return await answer("chat", request, rq.parse(await request.body(), schemas.Chat))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer("text", request, rq.parse(await request.body(), schemas.Completion))

    return Guard(app, api_key, max_body)


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
    reasoning = getattr(args, "reasoning", "separate")
    return Service(engine, model, settings_from(args), reasoning, template_kwargs(args))


def api_key(args: argparse.Namespace) -> str | None:
    """The key clients must send: ``--api-key-file`` (kept out of ``ps``), ``--api-key``, else
    the ``DANLU_API_KEY`` environment variable."""
    return read_secret(
        getattr(args, "api_key", None), getattr(args, "api_key_file", None), "DANLU_API_KEY", "--api-key-file"
    )


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
    warning = exposure_warning(args.host, bool(key), "an API key (--api-key-file, DANLU_API_KEY)")
    if warning:
        print(warning)
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
    p.add_argument(
        "--reasoning",
        default="separate",
        choices=["separate", "hidden", "raw"],
        help="a reasoning model's <think> block: in the message's reasoning_content (default), "
        "dropped, or left in the content as the model wrote it",
    )
    p.add_argument("--max-batch", type=int, default=32, help="replies decoded together (default 32)")
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests queued beyond those; more get 429 (default 256)",
    )
    add_thinking_flag(p)
    add_loading_flags(p)
    add_generation_flags(p, api=True)
    p.set_defaults(func=run_serve)
