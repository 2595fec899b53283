"""One inference engine: load a base (+ adapters), stream tokens for messages or a plain prompt.

Terminal chat, the web page (:mod:`danlu.app.web`) and the OpenAI-compatible server
(:mod:`danlu.app.server`) all sit on :class:`Engine`. The prompt is rendered with the chat
template saved next to the adapter when there is one (the template the run trained with),
else the base model's; generation stops on the template's end-of-turn token.

Several adapters may share one base (peft ``load_adapter`` with a name per adapter). A lock
is held for each whole generation, so switching adapters between requests never mixes them:
requests are served one at a time, correctness over throughput.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import model as mdl
from danlu.errors import UserError


@dataclass
class GenerationSettings:
    """Sampling settings; ``temperature=0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class Generation:
    """One reply in the making: iterate for text pieces; counts and finish reason are set at the end.

    ``finish_reason`` is ``"stop"`` (end-of-turn token, or the reader stopped early) or
    ``"length"`` (``max_new_tokens`` reached). Closing the iterator early stops the model.
    """

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    pieces: Iterator[str] = field(default_factory=lambda: iter(()), repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def stop(self) -> None:
        """Ask the model to stop at its next token; safe from any thread (e.g. a client went away)."""
        self.cancelled.set()

    def text(self) -> str:
        """Run to the end and return the whole text (not stripped)."""
        return "".join(self.pieces)


class _Cancelled:
    """A stopping criterion that ends generation once the reader has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class Engine:
    """A loaded model (with optional LoRA adapters) ready to answer conversations.

    ``adapter`` is the primary adapter (what :meth:`stream` uses); ``adapters`` maps further
    names to adapter folders over the same base, for front ends that pick one per request.
    ``trust_remote_code`` lets the model (and tokenizers) run their own code; a model that needs
    it is otherwise refused in one line naming ``--trust-remote-code``.
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
    ) -> None:
        self.model_ref = model
        named: dict[str, str] = {}
        if adapter:
            named[str(adapter)] = str(adapter)
        for name, path in (adapters or {}).items():
            named[name] = str(path)
        self.adapter = str(adapter) if adapter else (next(iter(named.values())) if named else None)
        self.primary = next(iter(named), None)  # name of the adapter `stream` uses
        self.adapter_dirs = named  # adapter name -> folder it was loaded from
        self.device, dtype = mdl.pick_device(precision)
        ref = mdl.resolve(model)
        with mdl.refusing_custom_code(model):
            self.base_tokenizer = mdl.load_tokenizer(ref, bool(trust_remote_code))
        quant = mdl.quantization_config(
            quantization, dtype
        )  # before loading: says if bitsandbytes is missing
        with mdl.refusing_custom_code(model):
            base = mdl.load_model(ref, dtype, self.device, bool(trust_remote_code), quant, device_map)
        # peft adapter names must be valid module keys, so user names map to internal ones
        self._peft_names: dict[str, str] = {}
        self.tokenizers: dict[str | None, Any] = {None: self.base_tokenizer}
        self.model = base
        for i, (name, path) in enumerate(named.items()):
            if not (Path(path) / "adapter_config.json").is_file():
                raise UserError(f"--adapter {path}: no adapter_config.json there; point it at OUTPUT/final")
            if i == 0:
                self.model = mdl.load_adapter(base, path)
                self._peft_names[name] = "default"
            else:
                self._peft_names[name] = f"adapter{i}"
                self.model.load_adapter(path, adapter_name=f"adapter{i}")
            own = (Path(path) / "tokenizer_config.json").is_file()  # the template the adapter trained with
            with mdl.refusing_custom_code(path):
                self.tokenizers[name] = (
                    mdl.load_tokenizer(path, bool(trust_remote_code)) if own else self.base_tokenizer
                )
        self.tokenizer = self.tokenizers[self.primary]
        self.model.eval()
        self.stop_ids = sorted(mdl.stop_token_ids(self.tokenizer, base))
        self._stops = {
            k: set(self.stop_ids) | mdl.stop_token_ids(t, base) for k, t in self.tokenizers.items()
        }
        self._lock = threading.Lock()

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def adapter_names(self) -> list[str]:
        """Names of the loaded adapters, primary first."""
        return list(self._peft_names)

    def encode(self, messages: list[dict]) -> torch.Tensor:
        """Prompt ids for ``messages`` (primary template) followed by the assistant's turn opener."""
        return self._encode(messages, self.tokenizer)

    def _encode(self, messages: list[dict], tokenizer: Any) -> torch.Tensor:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def encode_text(self, prompt: str) -> torch.Tensor:
        """Ids of a plain prompt, no chat template (for text completion)."""
        ids = self.base_tokenizer(prompt, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def _select(self, adapter: str | None) -> Any:
        """Activate ``adapter`` (None: the bare base) for one generation; call with the lock held."""
        if not self._peft_names:
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self._peft_names[adapter])
        return nullcontext()

    def chat(
        self, messages: list[dict], settings: GenerationSettings | None = None, adapter: str | None = None
    ) -> Generation:
        """Start a reply to ``messages`` with the named adapter (``None``: the bare base model).

        The prompt uses that adapter's saved template, or the base's.
        """
        if adapter is not None and adapter not in self._peft_names:
            raise KeyError(f"no adapter named {adapter!r}; loaded: {', '.join(self._peft_names) or 'none'}")
        tokenizer = self.tokenizers[adapter]
        return self._generate(self._encode(messages, tokenizer), settings, adapter, tokenizer)

    def complete(
        self, prompt: str, settings: GenerationSettings | None = None, adapter: str | None = None
    ) -> Generation:
        """Start a plain-text continuation of ``prompt`` (no chat template)."""
        if adapter is not None and adapter not in self._peft_names:
            raise KeyError(f"no adapter named {adapter!r}")
        return self._generate(self.encode_text(prompt), settings, adapter, self.base_tokenizer)

    def _generate(
        self, ids: torch.Tensor, settings: GenerationSettings | None, adapter: str | None, tokenizer: Any
    ) -> Generation:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        settings = settings or GenerationSettings()
        stops = self._stops.get(adapter, set(self.stop_ids))
        gen = Generation(prompt_tokens=int(ids.shape[1]))
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = gen.cancelled
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock:  # 1) one generation at a time: the active adapter is shared state
                    if cancel.is_set():
                        streamer.end()
                        return
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    with torch.inference_mode(), self._select(adapter):
                        out = self.model.generate(
                            input_ids=ids,
                            attention_mask=torch.ones_like(ids),
                            eos_token_id=sorted(stops),
                            pad_token_id=tokenizer.pad_token_id,
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                            **settings.kwargs(),
                        )
                # 2) counts and why it stopped, from the sequence itself
                new = out[0, ids.shape[1] :].tolist()
                gen.completion_tokens = len(new)
                hit_stop = bool(new) and new[-1] in stops
                full = len(new) >= settings.max_new_tokens
                gen.finish_reason = "length" if full and not hit_stop and not cancel.is_set() else "stop"
            except BaseException as e:  # surfaced in the caller's thread below
                failure.append(e)
                streamer.end()

        def pieces() -> Iterator[str]:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            finished = False
            try:
                yield from streamer
                finished = True
            finally:
                if not finished:
                    cancel.set()  # a reader that stops early stops the model at the next token
            worker.join()
            if failure:
                raise failure[0]

        gen.pieces = pieces()
        return gen

    def stream(
        self, messages: list[dict], settings: GenerationSettings | None = None, use_adapter: bool = True
    ) -> Iterator[str]:
        """Yield the reply's text piece by piece as tokens are generated.

        Renders with the primary template either way, so ``use_adapter=False`` compares the
        bare base on exactly the same prompt.
        """
        key = self.primary if use_adapter else None
        yield from self._generate(self.encode(messages), settings, key, self.tokenizer)

    def reply(
        self, messages: list[dict], settings: GenerationSettings | None = None, use_adapter: bool = True
    ) -> str:
        """The whole reply as one string."""
        return "".join(self.stream(messages, settings, use_adapter)).strip()

    @torch.inference_mode()
    def logits(self, messages: list[dict], use_adapter: bool = True) -> torch.Tensor:
        """Next-token logits over the rendered prompt (for parity checks)."""
        ids = self.encode(messages)
        with self._lock, self._select(self.primary if use_adapter else None):
            return self.model(input_ids=ids).logits.float()
