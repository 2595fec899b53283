"""One inference engine: load base (+ adapter), stream tokens for a list of messages.

Terminal chat uses it today; the web page and the HTTP API are meant to sit on the same
class. The prompt is rendered with the chat template saved next to the adapter when there
is one (the template the run trained with), else the base model's; generation stops on the
template's end-of-turn token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu import model as mdl


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


class Engine:
    """A loaded model ready to answer conversations."""

    def __init__(
        self,
        model: str,
        adapter: str | Path | None = None,
        *,
        precision: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        self.model_ref = model
        self.adapter = str(adapter) if adapter else None
        self.device, dtype = mdl.pick_device(precision)
        ref = mdl.resolve(model)
        tokenizer_src = ref
        if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_src = str(adapter)  # the template the adapter was trained with
        self.tokenizer = mdl.load_tokenizer(tokenizer_src, trust_remote_code)
        base = mdl.load_model(ref, dtype, self.device, trust_remote_code)
        self.model = mdl.load_adapter(base, adapter) if adapter else base
        self.model.eval()
        self.stop_ids = sorted(mdl.stop_token_ids(self.tokenizer, base))

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    def encode(self, messages: list[dict]) -> torch.Tensor:
        """Prompt ids for ``messages`` followed by the assistant's turn opener."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def _adapter_context(self, use_adapter: bool) -> Any:
        if self.has_adapter and not use_adapter:
            return self.model.disable_adapter()
        return nullcontext()

    def stream(
        self, messages: list[dict], settings: GenerationSettings | None = None, use_adapter: bool = True
    ) -> Iterator[str]:
        """Yield the reply's text piece by piece as tokens are generated."""
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        ids = self.encode(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.inference_mode(), self._adapter_context(use_adapter):
                    self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        eos_token_id=self.stop_ids,
                        pad_token_id=self.tokenizer.pad_token_id,
                        streamer=streamer,
                        **settings.kwargs(),
                    )
            except BaseException as e:  # surfaced in the caller's thread below
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]

    def reply(
        self, messages: list[dict], settings: GenerationSettings | None = None, use_adapter: bool = True
    ) -> str:
        """The whole reply as one string."""
        return "".join(self.stream(messages, settings, use_adapter)).strip()

    @torch.inference_mode()
    def logits(self, messages: list[dict], use_adapter: bool = True) -> torch.Tensor:
        """Next-token logits over the rendered prompt (for parity checks)."""
        ids = self.encode(messages)
        with self._adapter_context(use_adapter):
            return self.model(input_ids=ids).logits.float()
