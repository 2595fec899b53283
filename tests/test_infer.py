"""The engine's loading options: a 4-bit or 8-bit base (bitsandbytes, which runs on the CPU
too), and a device map that spreads the model over the visible devices."""

from __future__ import annotations

import importlib.util

import pytest

from danlu.app.cli import build_parser, loading_options
from danlu.infer import Engine, GenerationSettings

GREEDY = GenerationSettings(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
HI = [{"role": "user", "content": "Hello there"}]
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


@needs_bnb
@pytest.mark.parametrize(("kind", "layer"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_base_with_an_adapter_answers(tiny_model_dir, tmp_path, kind, layer):
    from test_server import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    engine = Engine(str(tiny_model_dir), adapter, precision="fp32", quantization=kind)
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert layer in kinds  # the base really is quantized ...
    assert any(n.endswith("lora_A") for n, _ in engine.model.named_modules())  # ... and carries the adapter
    reply = engine.chat(HI, GREEDY, adapter=str(adapter))
    text = reply.text()
    assert reply.completion_tokens > 0 and reply.finish_reason in ("stop", "length")
    assert isinstance(text, str)


def test_device_map_auto_is_handed_to_transformers(tiny_model_dir, monkeypatch):
    """With one device there is nothing to spread; what matters here is that the map reaches
    transformers' loader (which hands it to accelerate) and the model is not moved after."""
    from transformers import AutoModelForCausalLM

    plain = Engine(str(tiny_model_dir), precision="fp32")
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    mapped = Engine(str(tiny_model_dir), precision="fp32", device_map="auto")
    assert seen["device_map"] == "auto"
    assert mapped.chat(HI, GREEDY).text() == plain.chat(HI, GREEDY).text()


@pytest.mark.parametrize("verb", ["chat", "serve", "web"])
def test_front_ends_take_the_loading_flags(verb):
    args = build_parser().parse_args(
        [verb, "--quantization", "nf4", "--device-map", "auto", "--precision", "bf16"]
    )
    assert loading_options(args) == {"precision": "bf16", "quantization": "nf4", "device_map": "auto"}


def test_missing_bitsandbytes_is_named_before_loading(tiny_model_dir, monkeypatch):
    from danlu.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        Engine(str(tiny_model_dir), precision="fp32", quantization="nf4")
