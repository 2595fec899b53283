"""danlu export gguf: what the written file holds, read back by llama.cpp itself.

Its tokenization must equal transformers' on strings with Chinese, code, emoji and special tokens
(SmolLM2's tokenizer, BLOOM's pre-split, and Llama-2, Llama-3, Qwen2 and Phi-3 rebuilt from
llama.cpp's vocab files); f16, bf16 and q8_0 tensors are the bytes llama.cpp's own quantizer
makes; the export streams (about one tensor in memory); what cannot be written is refused in one
line. Shared builders and fixtures: tests/gguf_helpers.py; logits: tests/test_gguf_llamacpp.py;
chat and Ollama: tests/test_gguf_ollama.py; LoRA adapters: tests/test_gguf_lora.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from danlu.app.cli import main
from danlu.errors import UserError
from danlu.export import export_gguf
from gguf_helpers import (
    CHAT,
    FAMILIES,
    TEXTS,
    build,
    byte_level_tokenizer,
    gguf_meta,
    llama_cpp,
    load,
    vocab_dir,
)

pytest_plugins = ["gguf_helpers"]  # its fixtures: family_dirs, real_tokenizer


# ------------------------------------------------------------------------- tokenizers


def assert_same_tokens(path: Path, tokenizer, texts=TEXTS) -> None:
    """llama.cpp's tokenization of every text equals transformers', with and without BOS/EOS."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if '"prepend_scheme": "first"' in json.dumps(backend.get("pre_tokenizer")):
        # tokenizers' Metaspace adds no '▁' before a text that starts with a space; llama.cpp's
        # SentencePiece always does (as sentencepiece does): a difference no GGUF key can express
        texts = [t for t in texts if not t[:1].isspace()]
    for text in texts:
        want = tokenizer(text)["input_ids"]
        got = llm.tokenize(text.encode(), special=True)  # the file's own add_bos decides
        assert got == want, (text, got, want)
        bare = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == bare, text
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    want = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == want
    assert llm.detokenize(want, special=True).decode() == tokenizer.decode(want)  # and back to text


def test_smollm2_tokenizer_in_llama_cpp(tiny_model_dir, tokenizer, tmp_path):
    path = export_gguf(tiny_model_dir, tmp_path / "m.gguf").path
    metadata = gguf_meta(path)
    assert metadata.get("tokenizer.ggml.model") == "gpt2"
    assert_same_tokens(path, tokenizer)


# BLOOM's tokenizer.json splits a text into runs up to a space or a punctuation mark
BLOOM_SPLIT = " ?[^(\\s|[.,!?…。，、।۔،])]+"


def bloom_tokenizer():
    """A tokenizer made as BLOOM's tokenizer.json is (its pre-split regex, then byte-level BPE
    without GPT-2's regex; <unk> <s> </s> <pad> first; nothing added around a text), its merges
    trained here on the test strings: BLOOM's own vocabulary is not among llama.cpp's vocab files."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BLOOM_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, initial_alphabet=alphabet)
    backend.train_from_iterator([*TEXTS, *(m["content"] for m in CHAT)] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tokenizer


def test_bloom_tokenizer_in_llama_cpp(tmp_path):
    """BLOOM's pre-split regex is written as llama.cpp's 'bloom' pre-tokenizer and splits alike."""
    tokenizer = bloom_tokenizer()
    src = build(tmp_path / "src", tokenizer, **FAMILIES["bloom"])
    path = export_gguf(src, tmp_path / "m.gguf").path
    metadata = gguf_meta(path)
    assert (metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")) == ("gpt2", "bloom")
    assert metadata.get("tokenizer.ggml.add_bos_token") is False
    assert_same_tokens(path, tokenizer)


# ------------------------------------------------------- real tokenizers from llama.cpp's tree


@pytest.mark.parametrize(
    "name, model",
    [("llama-spm", "llama"), ("phi-3", "llama"), ("llama-bpe", "gpt2"), ("qwen2", "gpt2")],
)
def test_real_tokenizers_tokenize_in_llama_cpp_as_in_transformers(real_tokenizer, name, model, tmp_path):
    """Llama-2 and Phi-3 (SentencePiece-style), Llama-3 and Qwen2 (byte-level BPE).

    The exported file must tokenize exactly as llama.cpp's own vocab file (made by its converter
    from the real model) and as the real model's transformers tokenizer on llama.cpp's 47 test
    vectors (runs of spaces and newlines, byte fallback, mixed scripts). Against the rebuilt
    transformers tokenizer it must agree wherever llama.cpp's own file does: llama.cpp itself
    differs from transformers after special tokens in SentencePiece models (it adds '▁'), on a
    literal '</s>' in Qwen2 text (it makes EOS-looking tokens special), and before a leading space.
    """
    tokenizer = real_tokenizer(name)
    src = build(tmp_path / "src", tokenizer, "llama", hidden_size=32, intermediate_size=64)
    path = export_gguf(src, tmp_path / "m.gguf").path
    metadata = gguf_meta(path)
    assert metadata.get("tokenizer.ggml.model") == model  # SentencePiece-style ones as llama.cpp's SPM
    ours = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    theirs = llama_cpp.Llama(
        model_path=str(vocab_dir() / f"ggml-vocab-{name}.gguf"), vocab_only=True, verbose=False
    )
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    agreed = 0
    for text in [*TEXTS, rendered]:
        got = ours.tokenize(text.encode(), add_bos=False, special=True)
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max(want) < theirs.n_vocab():  # (the rebuilt Llama-3 has an extra <|endoftext|>)
            assert got == theirs.tokenize(text.encode(), add_bos=False, special=True), text
        agreed += got == want
    assert agreed >= len(TEXTS) - 2, agreed
    inp = (
        (vocab_dir() / f"ggml-vocab-{name}.gguf.inp")
        .read_text(encoding="utf-8")
        .split("\n__ggml_vocab_test__\n")
    )
    out = (vocab_dir() / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    for text, ids in zip(inp, out, strict=True):
        assert ours.tokenize(text.encode(), add_bos=False, special=False) == [int(i) for i in ids.split()], (
            text
        )
    # BOS as transformers adds it: Llama-3's comes from the post-processor, whatever the attribute says
    add_bos = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    assert add_bos == (name != "qwen2")
    assert metadata.get("tokenizer.ggml.add_bos_token") is add_bos
    text = "Hello 丹炉"
    assert ours.tokenize(text.encode(), special=True) == tokenizer(text)["input_ids"]


# ----------------------------------------------------------------------------- memory


def test_export_holds_about_one_tensor_in_memory(tmp_path):
    """Peak traced (numpy + Python) memory of an f16 export of a 31 MB model: the old writer kept
    every f16 tensor until the end (15.7 MB here); streaming holds about one (the largest is 1 MB
    in f32). Measured: 3.0 MB."""
    import tracemalloc

    src = build(tmp_path / "src", byte_level_tokenizer(), "llama", hidden_size=256, intermediate_size=1024,
                num_hidden_layers=8, tie_word_embeddings=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(src)
    f16_bytes = sum(p.numel() * 2 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    del model
    assert f16_bytes > 15e6 and largest <= 1.1e6
    tracemalloc.start()
    try:
        export_gguf(src, tmp_path / "m.gguf", qtype="f16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak traced memory {peak / 1e6:.1f} MB for {f16_bytes / 1e6:.1f} MB of f16 tensors")
    assert peak < 5 * largest
    assert load(tmp_path / "m.gguf", n_ctx=64).n_vocab() == 258  # and the file is whole


# ------------------------------------------------------------------------------ types


@pytest.fixture(scope="module")
def qwen2_f32(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen2 (biases, kept f32, and an untied output) and its f32 GGUF, which llama.cpp's
    quantizer starts from. Its vocabulary is the 258-token byte-level one: the bytes compared do
    not depend on it, and gguf-py reads SmolLM2's 49k tokens in 2 s a file."""
    folder = tmp_path_factory.mktemp("qwen2-bytes")
    src = build(folder / "src", byte_level_tokenizer(), vocab_size=288, **FAMILIES["qwen2"])
    return src, export_gguf(src, folder / "f32.gguf", qtype="f32").path


@pytest.mark.parametrize("qtype, ftype", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_types_danlu_writes_are_bit_identical_to_llama_cpps_own(qtype, ftype, qwen2_f32, tmp_path):
    """f16, bf16 and q8_0 come from gguf's numpy encoders: the same bytes llama.cpp's quantizer
    makes from the f32 file."""
    from gguf import GGUFReader

    src, f32 = qwen2_f32
    ours = export_gguf(src, tmp_path / "ours.gguf", qtype=qtype).path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert (
        llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp_path / "theirs.gguf").encode(), params) == 0
    )
    a = {t.name: t for t in GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in GGUFReader(str(tmp_path / "theirs.gguf")).tensors}
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
    assert {t.tensor_type.name for t in a.values()} == {"F32", ftype}


# -------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "config, says",
    [
        ({"architectures": ["MixtralForCausalLM"]}, "convert_hf_to_gguf.py (mixture-of-experts)"),
        ({"architectures": ["BloomForCausalLM"], "apply_residual_connection_post_layernorm": True},
         "apply_residual_connection_post_layernorm"),
        ({"architectures": ["FalconForCausalLM"], "alibi": True}, "Falcon with alibi=true"),
        ({"architectures": ["Gemma3ForConditionalGeneration"]}, "Gemma3ForCausalLM"),
        ({"architectures": ["GPT2LMHeadModel"]}, "Qwen3ForCausalLM"),
        (
            {"architectures": ["Qwen2ForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "rope scaling 'yarn'",
        ),
        ({"architectures": ["Gemma2ForCausalLM"], "head_dim": 256, "query_pre_attn_scalar": 144,
          "hidden_size": 4608, "num_attention_heads": 32}, "query_pre_attn_scalar 144"),
    ],
)  # fmt: skip
def test_what_cannot_be_written_is_refused_in_one_line_naming_what_to_use(config, says, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "x.gguf"
    assert main(["export", "gguf", "--model", str(tmp_path / "m"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_k_quants_without_llama_cpp_say_what_to_install(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(UserError, match=r"danlu\[llama-cpp\]"):
        export_gguf(tiny_model_dir, tmp_path / "m.gguf", qtype="q4_k_m")
    assert list(tmp_path.iterdir()) == []
