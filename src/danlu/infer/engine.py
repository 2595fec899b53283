"""The engine behind chat, web and serve: prompts in, replies streamed out, many at once.

:class:`Engine` renders conversations with the right chat template (an adapter's own, else the
base's; tools passed into it), checks them against the context window, and hands them to the
continuous-batching decoder (:mod:`danlu.infer.batch`), which answers every request side by side.
Mistakes in a request (a template that refuses the conversation, a prompt too long, settings
out of range) are :class:`RequestError`: one line, with the parameter to blame.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from danlu.errors import UserError
from danlu.infer.adapters import Registry
from danlu.infer.batch import Batcher, Request
from danlu.infer.generation import Generation
from danlu.infer.reasoning import opens_reasoning
from danlu.infer.sampling import GenerationSettings


class RequestError(UserError):
    """A request the engine refuses: one line; ``param`` names what to change (OpenAI's field)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class ContextLengthError(RequestError):
    """Prompt plus reply would not fit the model's context window."""

    def __init__(self, window: int, prompt: int, reply: int | None) -> None:
        if reply is None:
            said = f"the prompt alone is {prompt} tokens"
        else:
            said = f"you requested {prompt + reply} tokens ({prompt} in the prompt, {reply} in the reply)"
        super().__init__(
            f"this model's maximum context length is {window} tokens, but {said}; "
            "shorten the conversation or ask for fewer tokens",
            "messages",
            "context_length_exceeded",
        )
        self.window, self.prompt, self.reply = window, prompt, reply


def _one_line(e: BaseException) -> str:
    from jinja2 import TemplateError

    said = " ".join(str(e).split())
    if type(e) is TemplateError:  # raise_exception() in the template: its own words
        return said
    return f"{type(e).__name__}: {said}" if said else type(e).__name__


class Engine:
    """A loaded model (with optional LoRA adapters) answering conversations, many at once.

    ``adapter`` is the primary adapter (what :meth:`stream` uses); ``adapters`` maps further
    names to adapter folders over the same base, for front ends that pick one per request.
    ``trust_remote_code`` lets the model (and tokenizers) run their own code; a model that needs
    it is otherwise refused in one line naming ``--trust-remote-code``. ``max_batch`` replies
    are decoded together; ``max_waiting`` more may queue (then :class:`~danlu.infer.batch.Busy`).
    """

    def __init__(
        self,
        model: str,
        adapter: str | Path | None = None,
        *,
        precision: str = "auto",
        trust_remote_code: bool = False,
        adapters: dict[str, str | Path] | None = None,
        quantization: str = "none",
        device_map: str | None = None,
        max_batch: int = 32,
        max_waiting: int = 256,
    ) -> None:
        self.model_ref = model
        named: dict[str, str] = {}
        if adapter:
            named[str(adapter)] = str(adapter)
        for name, path in (adapters or {}).items():
            named[name] = str(path)
        self.adapter = str(adapter) if adapter else (next(iter(named.values())) if named else None)
        self.adapter_dirs = named  # adapter name -> folder it was loaded from
        self.registry = Registry(
            model,
            named,
            precision=precision,
            trust_remote_code=trust_remote_code,
            quantization=quantization,
            device_map=device_map,
        )
        r = self.registry
        self.primary = r.primary  # name of the adapter `stream` uses
        self.device, self.model, self.base_tokenizer, self.tokenizers = (
            r.device,
            r.model,
            r.base_tokenizer,
            r.tokenizers,
        )
        self.tokenizer = r.tokenizers[r.primary]
        self.stop_ids = r.stop_ids
        self.context_window, self.vocab_size = r.context_window, r.vocab_size
        self._model_lock = threading.RLock()  # adapter switching is shared state: one forward at a time
        self.batcher = Batcher(r.model, r.device, r.select, self._model_lock, max_batch, max_waiting)

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def adapter_names(self) -> list[str]:
        """Names of the loaded adapters, primary first."""
        return list(self.registry.peft_names)

    # ------------------------------------------------------------------ prompts

    def prompt_ids(
        self,
        messages: list[dict],
        adapter: str | None = None,
        tools: list | None = None,
        template_kwargs: dict | None = None,
    ) -> list[int]:
        """Prompt ids for ``messages`` in ``adapter``'s template (None: the base's), with the
        assistant's turn opener; ``tools`` (function schemas) and ``template_kwargs`` (e.g.
        ``enable_thinking``) go into the template."""
        text = self.prompt_text(messages, adapter, tools, template_kwargs)
        return self.tokenizers[adapter](text, add_special_tokens=False)["input_ids"]

    def prompt_text(
        self,
        messages: list[dict],
        adapter: str | None = None,
        tools: list | None = None,
        template_kwargs: dict | None = None,
    ) -> str:
        """:meth:`prompt_ids` as the rendered text."""
        self.registry.check(adapter)
        tokenizer = self.tokenizers[adapter]
        variables = check_template_kwargs(template_kwargs)
        extra = {**variables, **({"tools": tools} if tools else {})}
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **extra
            )
        except Exception as e:  # noqa: BLE001 - the template is the model's code: what it raises is about the chat
            raise RequestError(
                f"the model's chat template cannot render this conversation ({_one_line(e)})",
                "tools" if tools and "tool" in str(e).lower() else "messages",
                "invalid_messages",
            ) from None
        if tools:
            try:
                plain = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **variables
                )
            except Exception:  # noqa: BLE001 - renders only with tools: it does use them
                plain = None
            if plain == text:
                raise RequestError(
                    "this model's chat template has no place for tools: it would never see them", "tools"
                )
        return text

    def encode(self, messages: list[dict]) -> torch.Tensor:
        """Prompt ids for ``messages`` (primary template) followed by the assistant's turn opener."""
        return torch.tensor([self.prompt_ids(messages, self.primary)], device=self.device)

    def encode_text(self, prompt: str) -> torch.Tensor:
        """Ids of a plain prompt, no chat template (for text completion)."""
        return torch.tensor([self.base_tokenizer(prompt)["input_ids"]], device=self.device)

    # ------------------------------------------------------------------ generation

    def submit(
        self,
        ids: list[int],
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        tokenizer: object = None,
        asked: int | None = None,
    ) -> Generation:
        """Queue a reply to prompt ``ids`` with ``adapter`` (None: the bare base).

        A reply that would run past the context window is cut to fit it; a prompt that fills the
        window, or ``asked`` (the reply tokens a client asked for explicitly) that would not fit
        beside it, is refused (:class:`ContextLengthError`, as OpenAI does). Raises
        :class:`~danlu.infer.batch.Busy` when the queue is full.
        """
        self.registry.check(adapter)
        settings = (settings or GenerationSettings()).checked(self.vocab_size)
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        budget = settings.max_new_tokens
        window = self.context_window
        if window is not None:
            if len(ids) >= window:
                raise ContextLengthError(window, len(ids), None)
            if asked is not None and len(ids) + asked > window:
                raise ContextLengthError(window, len(ids), asked)
            budget = min(budget, window - len(ids))
        gen = Generation(len(ids), budget)
        tok = tokenizer if tokenizer is not None else self.tokenizers[adapter]
        stops = self.registry.stops.get(adapter, set(self.stop_ids))
        self.batcher.submit(Request(gen, list(ids), settings, adapter, stops, tok))
        return gen

    def chat(
        self,
        messages: list[dict],
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        tools: list | None = None,
        asked: int | None = None,
        template_kwargs: dict | None = None,
    ) -> Generation:
        """Start a reply to ``messages`` with the named adapter (``None``: the bare base model),
        rendered with that adapter's saved template, or the base's. ``reasoning_open`` on the
        reply says whether the template opened a ``<think>`` block the reply starts inside."""
        text = self.prompt_text(messages, adapter, tools, template_kwargs)
        ids = self.tokenizers[adapter](text, add_special_tokens=False)["input_ids"]
        gen = self.submit(ids, settings, adapter, self.tokenizers[adapter], asked)
        gen.reasoning_open = opens_reasoning(text)
        return gen

    def complete(
        self,
        prompt: str,
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        asked: int | None = None,
    ) -> Generation:
        """Start a plain-text continuation of ``prompt`` (no chat template)."""
        self.registry.check(adapter)
        ids = self.base_tokenizer(prompt)["input_ids"]
        return self.submit(ids, settings, adapter, self.base_tokenizer, asked)

    def stream(
        self,
        messages: list[dict],
        settings: GenerationSettings | None = None,
        use_adapter: bool = True,
        template_kwargs: dict | None = None,
    ) -> Iterator[str]:
        """Yield the reply's text piece by piece as tokens are generated.

        Renders with the primary template either way, so ``use_adapter=False`` compares the
        bare base on exactly the same prompt.
        """
        yield from self.start(messages, settings, use_adapter, template_kwargs)

    def start(
        self,
        messages: list[dict],
        settings: GenerationSettings | None = None,
        use_adapter: bool = True,
        template_kwargs: dict | None = None,
    ) -> Generation:
        """:meth:`stream`'s reply as a :class:`Generation` (for readers on an asyncio loop)."""
        text = self.prompt_text(messages, self.primary, None, template_kwargs)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        key = self.primary if use_adapter else None
        gen = self.submit(ids, settings, key, self.tokenizer)
        gen.reasoning_open = opens_reasoning(text)
        return gen

    def reply(
        self, messages: list[dict], settings: GenerationSettings | None = None, use_adapter: bool = True
    ) -> str:
        """The whole reply as one string."""
        return "".join(self.stream(messages, settings, use_adapter)).strip()

    @torch.inference_mode()
    def logits(self, messages: list[dict], use_adapter: bool = True) -> torch.Tensor:
        """Next-token logits over the rendered prompt (for parity checks)."""
        ids = self.encode(messages)
        with self._model_lock, self.registry.select(self.primary if use_adapter else None):
            return self.model(input_ids=ids).logits.float()

    def shutdown(self) -> None:
        """Stop every reply and wait for the decoding thread to end (before the program exits)."""
        self.batcher.shutdown()


def check_template_kwargs(kwargs: dict | None) -> dict:
    """Extra variables for the chat template (``enable_thinking``, ...), refused where they would
    change how the template is called rather than what it sees (``tokenize``, ``tools``, ...)."""
    if not kwargs:
        return {}
    if not isinstance(kwargs, dict):
        raise RequestError("chat_template_kwargs must be an object", "chat_template_kwargs")
    import inspect

    from transformers import PreTrainedTokenizerBase

    params = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    taken = sorted(k for k in kwargs if k in params or not str(k).isidentifier())
    if taken:
        raise RequestError(
            f"chat_template_kwargs cannot set {', '.join(map(str, taken))}: give template variables "
            "such as enable_thinking",
            "chat_template_kwargs",
        )
    return dict(kwargs)


def tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """The function calls in a reply, in the formats chat templates teach, and the text around them.

    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen, SmolLM3),
    or a reply that is nothing but such an object or a list of them (Llama 3's
    ``{"name": ..., "parameters": ...}``). Only functions named in ``tools`` count; a reply with
    anything else (or malformed JSON) is plain text: ``(text, [])``.
    """
    names = {(t.get("function") or {}).get("name") for t in tools if isinstance(t, dict)}
    blocks = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S)
    if blocks:
        rest = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.S).strip()
    else:
        blocks, rest = [text.strip()], ""
    calls = []
    for block in blocks:
        try:
            found = json.loads(block)
        except ValueError:
            return text, []
        for call in found if isinstance(found, list) else [found]:
            if not isinstance(call, dict) or call.get("name") not in names:
                return text, []
            args = call.get("arguments", call.get("parameters", {}))
            if not isinstance(args, dict | str):
                return text, []
            calls.append(
                {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}
            )
    return (rest or None), calls
