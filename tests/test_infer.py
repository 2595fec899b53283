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
    from server_helpers import make_adapter

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
    from server_helpers import make_adapter

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

    from server_helpers import make_adapter

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


# ------------------------------------------------------------------ the batching engine


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    from server_helpers import make_adapter

    root = tmp_path_factory.mktemp("infer-adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


def test_replies_decoded_together_equal_transformers_generate_one_at_a_time(tiny_model_dir, two_adapters):
    """Requests of different lengths and adapters arrive while others decode: each reply is what
    transformers' own generate() gives for it alone, and forwards were shared."""
    import random
    import threading
    import time

    from transformers import AutoModelForCausalLM

    engine = Engine(str(tiny_model_dir), adapters=two_adapters, precision="fp32")
    rng = random.Random(0)
    jobs = [
        (
            [{"role": "user", "content": "word " * rng.randint(1, 60) + str(i)}],
            rng.choice([None, "a", "b"]),
            rng.randint(1, 24),
        )
        for i in range(18)
    ]
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    models = {None: base}
    for name, path in two_adapters.items():
        models[name] = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), path
        ).eval()
    expected = []
    for messages, adapter, n in jobs:
        ids = torch.tensor([engine.prompt_ids(messages, adapter)])
        with torch.inference_mode():
            out = models[adapter].generate(
                input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=engine.stop_ids, pad_token_id=0
            )
        expected.append(engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    got: list[str | None] = [None] * len(jobs)

    def one(i: int) -> None:
        time.sleep(rng.random() * 0.2)
        messages, adapter, n = jobs[i]
        settings = GenerationSettings(max_new_tokens=n, temperature=0, repetition_penalty=1.0)
        got[i] = engine.chat(messages, settings, adapter).text()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert engine.batcher.widest > 1 and engine.batcher.steps < sum(n for _, _, n in jobs)


def test_stop_strings_cut_across_tokens_and_characters_come_out_whole(tiny_model_dir):
    from danlu.infer.generation import Detokenizer

    engine = Engine(str(tiny_model_dir), precision="fp32")
    tok = engine.tokenizer

    def feed(text: str, stops: tuple[str, ...] = ()) -> tuple[list[str], bool]:
        d, pieces = Detokenizer(tok, stops), []
        for t in tok.encode(text, add_special_tokens=False):
            delta, hit = d.add(t, None)
            pieces += [delta.text] if delta else []
            if hit:
                return pieces, True
        last = d.flush()
        return pieces + ([last.text] if last else []), False

    pieces, hit = feed("Hello world, 日本語 and more")
    assert "".join(pieces) == "Hello world, 日本語 and more" and not hit
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 3
    pieces, hit = feed("Hello world, this", ("o w",))
    assert "".join(pieces) == "Hell" and hit  # "o w" spans two tokens
    pieces, hit = feed("Hello world, 日本語 and more", ("本語", "zz"))
    assert "".join(pieces) == "Hello world, 日" and hit


def test_a_prompt_too_long_is_refused_and_a_long_reply_cut_to_the_window(tiny_model_dir):
    from danlu.infer import ContextLengthError

    engine = Engine(str(tiny_model_dir), precision="fp32")
    with pytest.raises(
        ContextLengthError, match=r"maximum context length is 512 tokens, but the prompt alone is \d+"
    ):
        engine.chat([{"role": "user", "content": "word " * 600}])
    near = [{"role": "user", "content": "word " * 470}]
    prompt = len(engine.prompt_ids(near))
    reply = engine.chat(near, GenerationSettings(max_new_tokens=100, temperature=0))
    reply.text()
    assert reply.completion_tokens == 512 - prompt and reply.finish_reason == "length"
    with pytest.raises(ContextLengthError, match=f"you requested {prompt + 100} tokens"):
        engine.chat(near, GenerationSettings(max_new_tokens=100), asked=100)


def test_a_template_that_refuses_the_conversation_is_a_one_line_user_error(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from danlu.errors import UserError
    from server_helpers import TOOL_TEMPLATE, make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(adapter)
    engine = Engine(str(tiny_model_dir), adapter, precision="fp32")
    with pytest.raises(UserError, match="cannot render this conversation .no system messages here.") as e:
        engine.reply([{"role": "system", "content": "x"}, *HI])
    assert "\n" not in str(e.value)


def test_seeds_sampling_settings_and_stopping(tiny_model_dir):
    import time

    from danlu.infer import Busy

    engine = Engine(str(tiny_model_dir), precision="fp32", max_batch=1, max_waiting=1)
    hot = GenerationSettings(max_new_tokens=8, temperature=2, top_p=1, top_k=0, seed=5)  # an int temperature
    assert engine.chat(HI, hot).text() == engine.chat(HI, hot).text()
    assert (
        engine.chat(HI, hot).text() != engine.chat(HI, GenerationSettings(**{**vars(hot), "seed": 6})).text()
    )
    with pytest.raises(Exception, match="top_p"):
        engine.chat(HI, GenerationSettings(top_p=0))
    long = GenerationSettings(max_new_tokens=400, temperature=0)
    first = engine.chat(HI, long)
    while engine.batcher.waiting:  # until the first is being decoded: one more may wait
        time.sleep(0.01)
    second = engine.chat(HI, long)
    with pytest.raises(Busy):
        engine.chat(HI, long)
    first.stop()
    second.stop()
    assert first.text() is not None and first.finish_reason == "stop" and first.completion_tokens < 400
    pieces = engine.stream(HI, long)
    next(pieces)
    pieces.close()  # a reader that leaves stops its reply
    from danlu.infer.batch import wait_idle

    assert wait_idle(engine.batcher, 5)
    engine.shutdown()
    assert engine.batcher.thread is None


def test_a_long_prompt_is_prefilled_in_chunks_beside_running_replies(tiny_model_dir):
    """Prompts longer than the prefill budget go in pieces, interleaved with other replies' steps,
    and give the same reply as in one piece."""
    engine = Engine(str(tiny_model_dir), precision="fp32")
    long = [{"role": "user", "content": "many words here " * 40}]
    settings = GenerationSettings(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
    whole = engine.chat(long, settings).text()
    steps = engine.batcher.steps
    engine.batcher.prefill_tokens = 16
    running = engine.chat(HI, GenerationSettings(max_new_tokens=200, temperature=0))
    chunked = engine.chat(long, settings)
    assert chunked.text() == whole
    assert engine.batcher.steps - steps >= len(engine.prompt_ids(long)) // 16
    assert not running.finished  # the other reply kept going, and is still going
    running.stop()
    running.text()
