"""The engine's loading options: a 4-bit or 8-bit base (bitsandbytes, which runs on the CPU
too), and a device map that spreads the model over the visible devices."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from danlu.app.cli import build_parser
from danlu.app.common import loading_options
from danlu.infer import Engine, GenerationSettings

GREEDY = GenerationSettings(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
HI = [{"role": "user", "content": "Hello there"}]
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def adapter_effect_agreement(engine: Engine, reference: Engine) -> float:
    """Cosine between what the adapter does to the logits in ``engine`` and in ``reference``."""
    effect = engine.logits(HI) - engine.logits(HI, use_adapter=False)
    expected = reference.logits(HI) - reference.logits(HI, use_adapter=False)
    assert expected.norm() > 0.5 * reference.logits(HI).norm()  # the adapter really moves the answer
    return float(torch.nn.functional.cosine_similarity(effect.flatten(), expected.flatten(), dim=0))


def dequantized_twin(engine: Engine, model_dir, adapter) -> Engine:
    """The same model and adapter in fp32 with each 4-bit weight replaced by its dequantized value:
    what the 4-bit engine must compute, up to the kernel's rounding (taken before any forward,
    which may repack the weights for the CPU kernel)."""
    import bitsandbytes as bnb

    twin = Engine(str(model_dir), adapter, precision="fp32")
    layers = dict(twin.model.named_modules())
    with torch.no_grad():
        for name, m in engine.model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                layers[name].weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    return twin


@needs_bnb
def test_nf4_base_with_an_adapter_computes_what_its_dequantized_weights_do(tiny_model_dir, tmp_path):
    from test_server import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    engine = Engine(str(tiny_model_dir), adapter, precision="fp32", quantization="nf4")
    assert "Linear4bit" in {type(m).__name__ for m in engine.model.modules()}  # the base really is 4-bit
    twin = dequantized_twin(engine, tiny_model_dir, adapter)
    reply = engine.chat(HI, GREEDY, adapter=str(adapter))
    assert reply.text() and reply.completion_tokens == 6 and reply.finish_reason == "length"
    assert relative(engine.logits(HI), twin.logits(HI)) < 0.02
    assert adapter_effect_agreement(engine, twin) > 0.99


@needs_bnb
def test_int8_base_with_an_adapter_follows_the_fp32_model(tiny_model_dir, tmp_path):
    """LLM.int8 also rounds the activations, so the reference is the fp32 model itself (measured:
    9% apart on this tiny model, the adapter's effect 0.997 alike)."""
    from test_server import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    engine = Engine(str(tiny_model_dir), adapter, precision="fp32", quantization="int8")
    assert "Linear8bitLt" in {type(m).__name__ for m in engine.model.modules()}
    full = Engine(str(tiny_model_dir), adapter, precision="fp32")
    reply = engine.chat(HI, GREEDY, adapter=str(adapter))
    assert reply.text() and reply.completion_tokens == 6
    assert relative(engine.logits(HI), full.logits(HI)) < 0.2
    assert adapter_effect_agreement(engine, full) > 0.98


def cpu_has_avx512_bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@needs_bnb
def test_4bit_layers_take_the_avx512_bf16_kernel_only_where_it_works(
    tiny_model_dir, wide_model_dir, tmp_path
):
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first inference
    forward. Layers narrower than a quantization block crash there, so they stay on the generic
    path; layers that fit use the kernel and still compute what the dequantized weights do."""
    if not cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")
    import bitsandbytes as bnb

    from test_server import make_adapter

    def packed(engine: Engine) -> dict[str, bool]:
        return {
            n: bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
            for n, m in engine.model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)
        }

    narrow = Engine(str(tiny_model_dir), precision="fp32", quantization="nf4")
    narrow.chat(HI, GREEDY).text()  # crashed in bitsandbytes before the narrow layers were kept off
    assert {n.rsplit(".", 1)[-1] for n, on in packed(narrow).items() if on} == {"down_proj"}  # 64 in, 32 out

    adapter = make_adapter(wide_model_dir, tmp_path / "a", seed=1)
    wide = Engine(str(wide_model_dir), adapter, precision="fp32", quantization="nf4")
    twin = dequantized_twin(wide, wide_model_dir, adapter)
    assert not any(packed(wide).values())
    logits = wide.logits(HI)
    assert all(packed(wide).values())  # the kernel's path ran on every layer
    assert relative(logits, twin.logits(HI)) < 0.06  # bf16 inside the kernel: 3% measured
    assert adapter_effect_agreement(wide, twin) > 0.99


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


@pytest.mark.parametrize("verb", ["chat", "serve", "web", "merge"])
def test_every_verb_after_train_takes_trust_remote_code(verb):
    """Off unless asked: unset (None) defers to the adapter's run config, else explicit either way."""
    required = ["--adapter", "a", "--out", "o"] if verb == "merge" else []
    parse = build_parser().parse_args
    assert parse([verb, *required]).trust_remote_code is None
    assert parse([verb, *required, "--trust-remote-code"]).trust_remote_code is True
    assert parse([verb, *required, "--no-trust-remote-code"]).trust_remote_code is False


def test_missing_bitsandbytes_is_named_before_loading(tiny_model_dir, monkeypatch):
    from danlu.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        Engine(str(tiny_model_dir), precision="fp32", quantization="nf4")
