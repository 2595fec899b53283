"""What a `danlu serve` request means: the body schemas, validation errors as OpenAI's 400s naming
the parameter, and a request turned into what the engine takes (messages, prompt, tools, sampling).

pydantic is imported inside functions so that ``danlu --help`` works without the ``serve`` extra.
(No ``from __future__ import annotations``: pydantic reads the schemas' annotations at runtime.)
"""

import functools
import json
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

MAX_N = 16  # choices per request
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


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
def schemas() -> SimpleNamespace:
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
        chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. enable_thinking

    class Completion(Sampling):
        prompt: str | list[str]
        logprobs: int | None = Field(None, ge=0, le=5)
        echo: bool = False
        suffix: str | None = None
        best_of: int | None = Field(None, ge=1)

    return SimpleNamespace(Chat=Chat, Completion=Completion)


def text_of(content: str | list[dict[str, Any]] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", f"messages[{i}].content")
        parts.append(part["text"])
    return "".join(parts)


def assistant_calls(calls: list[dict], i: int) -> list[dict]:
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


def parse(raw: bytes, schema: Any) -> Any:
    """The request body validated against ``schema``, or the 400 that says what is wrong with it."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer of 4,300+ digits
        said = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise APIError(400, f"request body is not valid JSON: {said}", None, "invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", None, "invalid_json") from None


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


def validation_error(errors: Any) -> APIError:
    """FastAPI/pydantic validation errors as one OpenAI-style 400 naming the parameter."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "request body is not valid JSON", None, "invalid_json")
    parts = [f"{_param(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors]
    param = _param(errors[0].get("loc", ())) if errors else None
    return APIError(400, "; ".join(dict.fromkeys(parts))[:500], param, "invalid_value")


def settings(req: Any, kind: str, defaults: Any, vocab: int | None) -> tuple[Any, bool]:
    """The request's sampling settings over ``defaults``, and whether it asked for more tokens than
    ``defaults.max_new_tokens`` (the server's limit, which caps it)."""
    limit = defaults.max_new_tokens
    asked = (req.max_completion_tokens or req.max_tokens) if kind == "chat" else req.max_tokens
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop takes at most 4 sequences", "stop")
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
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
    chosen = replace(
        defaults,
        **{k: v for k, v in given.items() if v is not None},
        max_new_tokens=min(asked or limit, limit),
        stop=tuple(s for s in stop if s),
        logit_bias=bias or None,
        logprobs=logprobs,
    )
    return chosen, asked is not None and asked > limit


def messages(req: Any) -> list[dict]:
    """The chat's messages as chat templates take them."""
    if not req.messages:
        raise APIError(400, "messages must hold at least one message", "messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"role '{m.role}' is not one of {', '.join(ROLES)}", f"messages[{i}].role")
        message: dict[str, Any] = {"role": ROLES[m.role], "content": text_of(m.content, i)}
        if m.tool_calls:
            message["tool_calls"] = assistant_calls(m.tool_calls, i)
        if m.role == "tool":
            message.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name)) if v})
        out.append(message)
    return out


def tools(req: Any) -> list[dict] | None:
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
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, "each tool must be {type: function, function: {name, ...}}", f"tools[{i}]")
    return req.tools


def prompt(req: Any) -> str:
    """A completion's one prompt."""
    text = req.prompt
    if isinstance(text, list):
        if len(text) != 1:
            raise APIError(400, "prompt must be one string (batches are not supported)", "prompt")
        text = text[0]
    if not text:
        raise APIError(400, "prompt must not be empty", "prompt")
    for field, bad in (("echo", req.echo), ("suffix", req.suffix), ("best_of", (req.best_of or 1) > 1)):
        if bad:
            raise APIError(400, f"{field} is not supported", field, "unsupported_parameter")
    return text
