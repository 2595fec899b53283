"""The adapter registry: one base model with named LoRA adapters over it, each with its tokenizer.

peft ``load_adapter`` adds each adapter under an internal name; :meth:`Registry.select`
switches one on (or all off, for the bare base) around a forward. The prompt of an adapter is
rendered with the chat template saved next to it (the one its run trained with), else the
base's; generation stops on the tokenizer's end-of-turn token and ``generation_config.json``'s.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from danlu import model as mdl
from danlu.errors import UserError


class Registry:
    """The loaded base, its adapters by name (primary first), their tokenizers and stop ids."""

    def __init__(
        self,
        model: str,
        named: dict[str, str],
        *,
        precision: str,
        trust_remote_code: bool,
        quantization: str,
        device_map: str | None,
    ) -> None:
        trust = bool(trust_remote_code)
        self.device, dtype = mdl.pick_device(precision)
        ref = mdl.resolve(model)
        with mdl.refusing_custom_code(model):
            self.base_tokenizer = mdl.load_tokenizer(ref, trust)
        quant = mdl.quantization_config(
            quantization, dtype
        )  # before loading: says if bitsandbytes is missing
        with mdl.refusing_custom_code(model):
            base = mdl.load_model(ref, dtype, self.device, trust, quant, device_map)
        # peft adapter names must be valid module keys, so user names map to internal ones
        self.peft_names: dict[str, str] = {}
        self.tokenizers: dict[str | None, Any] = {None: self.base_tokenizer}
        self.model = base
        for i, (name, path) in enumerate(named.items()):
            if not (Path(path) / "adapter_config.json").is_file():
                raise UserError(f"--adapter {path}: no adapter_config.json there; point it at OUTPUT/final")
            if i == 0:
                self.model = mdl.load_adapter(base, path)
                self.peft_names[name] = "default"
            else:
                self.peft_names[name] = f"adapter{i}"
                self.model.load_adapter(path, adapter_name=f"adapter{i}")
            own = (Path(path) / "tokenizer_config.json").is_file()  # the template the adapter trained with
            with mdl.refusing_custom_code(path):
                self.tokenizers[name] = mdl.load_tokenizer(path, trust) if own else self.base_tokenizer
        self.primary = next(iter(named), None)
        self.model.eval()
        self.stop_ids = sorted(mdl.stop_token_ids(self.tokenizers[self.primary], base))
        self.stops = {k: set(self.stop_ids) | mdl.stop_token_ids(t, base) for k, t in self.tokenizers.items()}
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        lengths = (getattr(config, k, None) for k in ("max_position_embeddings", "n_positions", "seq_length"))
        self.context_window: int | None = next((int(v) for v in lengths if v), None)
        head = base.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(config.vocab_size)

    def check(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.peft_names:
            raise KeyError(f"no adapter named {adapter!r}; loaded: {', '.join(self.peft_names) or 'none'}")

    def select(self, adapter: str | None) -> AbstractContextManager:
        """Switch ``adapter`` on (None: the bare base) for one forward; call with the model's lock held."""
        if not self.peft_names:
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self.peft_names[adapter])
        return nullcontext()
