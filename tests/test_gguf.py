"""danlu export gguf, judged by llama.cpp itself (llama-cpp-python, built by `make install`).

Every exported file is loaded by llama.cpp: its tokenization must equal transformers' on strings
with Chinese, code, emoji and special tokens; its logits for a chat prompt must equal
transformers' (f32 to float rounding, the other types within bounds measured here and stated
next to them); generation through the file's own chat template must stop at the end of turn.
Tokenizers are real ones: SmolLM2's (the embedded model), and Llama-2 (SentencePiece), Llama-3,
Qwen2 and Phi-3 rebuilt by transformers from the vocab-only GGUFs in llama.cpp's source tree
(`make vocab`, part of `make test`, extracts them into build/vocab/). Models are tiny and random.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from danlu.app.cli import main
from danlu.errors import UserError
from danlu.export import export_gguf

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: `make install`, or pip install 'danlu[llama-cpp]'"
)

TEXTS = [
    "Hello world! How are you today?",
    "丹炉：微调、合并、导出。你好，世界！",
    "def f(x):\n    return x ** 2  # squares\n\tprint(f'{x=}')",
    "emoji 🙂🔥👍🏽 and ümlauts, naïve café",
    "  leading spaces,   runs   of spaces\n\n\nand newlines 12345 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] tags </s> <|endoftext|> <|eot_id|> <|begin_of_text|>",
]
CHAT = [
    {"role": "system", "content": "You are Danlu (丹炉), a helpful assistant."},
    {"role": "user", "content": "你好！Please explain LoRA in one sentence, 用中文和英文。"},
]


def vocab_dir() -> Path:
    """llama.cpp's vocab-only GGUFs (models/ggml-vocab-*.gguf of its source tree): `make vocab`."""
    return Path(
        os.environ.get("DANLU_LLAMA_VOCAB") or Path(__file__).resolve().parent.parent / "build" / "vocab"
    )


def load(path: Path, **kwargs) -> llama_cpp.Llama:
    """The file in llama.cpp, computing in f32 where it can (f32 KV cache)."""
    kwargs.setdefault("n_ctx", 512)
    return llama_cpp.Llama(
        model_path=str(path), logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2, **kwargs
    )


def lcpp_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


@torch.no_grad()
def hf_logits(model_dir: Path, ids: list[int], round_to: torch.dtype | None = None) -> np.ndarray:
    """transformers' logits in fp32; ``round_to``: with the weights rounded to that type first."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if round_to is not None:
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.to(round_to).float())
    return model(torch.tensor([ids])).logits[0].double().numpy()


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def chat_ids(tokenizer) -> list[int]:
    return list(
        tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


def build(path: Path, tokenizer, model_type: str, **overrides) -> Path:
    """A tiny random model of ``model_type`` around ``tokenizer``, saved with it."""
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    kwargs = {
        k: v for k, v in kwargs.items() if not (k in overrides and v is None)
    }  # an override of None drops the key
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1 (and Gemma's away from 0), so a wrong shift shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {"reader": reader, "types": {t.name: t.tensor_type.name for t in reader.tensors}}


def meta(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


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
    reader = gguf_fields(path)["reader"]
    assert meta(reader, "tokenizer.ggml.model") == "gpt2"
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
    reader = gguf_fields(path)["reader"]
    assert (meta(reader, "tokenizer.ggml.model"), meta(reader, "tokenizer.ggml.pre")) == ("gpt2", "bloom")
    assert meta(reader, "tokenizer.ggml.add_bos_token") is False
    assert_same_tokens(path, tokenizer)


# ----------------------------------------------------------------------- architectures

# Tiny random models of each family (64 wide, 2 layers, 4 query heads over 2 kv heads) with
# SmolLM2's tokenizer; each overrides what makes its family differ from Llama.
FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True),  # head_dim ≠ 64/4; q/k norms
    "phi3": dict(model_type="phi3", sliding_window=None, tie_word_embeddings=False),  # fused qkv, gate_up
    # softcapping, sliding window 16 over a 45-token prompt, Gemma's (1 + w) norms, head_dim ≠ 64/4
    "gemma2": dict(model_type="gemma2", head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": dict(model_type="gemma3_text", head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                   num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Llama-3.1's rope scaling: original context 32, so most frequencies of a 16-dim head are rescaled
    "llama3.1": dict(model_type="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # ALiBi, LayerNorm with biases, fused qkv grouped per head, a 4x GELU MLP, tied output
    "bloom": dict(model_type="bloom", intermediate_size=None, num_key_value_heads=None,
                  max_position_embeddings=None),
    # Falcon-7B's shape: multi-query, attention and MLP in parallel from one LayerNorm, rotary
    "falcon": dict(model_type="falcon", multi_query=True, parallel_attn=True, alibi=False,
                   intermediate_size=None, num_key_value_heads=None, ffn_hidden_size=128),
    # Falcon-40B's: the new decoder (2 kv groups in the fused qkv; ln_attn and ln_mlp)
    "falcon40b": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2,
                      intermediate_size=None, num_key_value_heads=None, ffn_hidden_size=128),
}  # fmt: skip


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = build(tmp_path_factory.mktemp(name), tokenizer, **FAMILIES[name])
        return made[name]

    return get


# Relative error |llama.cpp - transformers| / |transformers| of the logits of a 45-token chat.
# f32: measured ≤ 1.2e-6 (float rounding), except Gemma's 2.3e-4, BLOOM's 3.1e-4 and Falcon's 3.8e-4:
# llama.cpp's CPU GELU reads its input rounded to f16 from an f16 table of the tanh approximation
# (BLOOM against transformers with its GELU's input and output rounded to f16: 4.4e-5; Falcon,
# whose transformers GELU is the exact one, against the tanh one in f16: 9.3e-6). The fused qkv
# left in transformers' order instead: 1.1 (BLOOM), 0.79 (Falcon-40B's shape). f16: against transformers with the weights rounded to f16,
# measured ≤ 1.4e-3 (llama.cpp also rounds activations to f16 in f16 matmuls).
BOUND = {"f32": 1e-5, "f16": 5e-3}
GELU_F32 = 1e-3  # Gemma, BLOOM, Falcon


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_runs_in_llama_cpp_like_transformers(family, family_dirs, tokenizer, tmp_path):
    src = family_dirs(family)
    ids = chat_ids(tokenizer)
    ref = hf_logits(src, ids)
    for qtype in ("f32", "f16"):
        path = export_gguf(src, tmp_path / f"{qtype}.gguf", qtype=qtype).path
        got = lcpp_logits(load(path), ids)
        want = ref if qtype == "f32" else hf_logits(src, ids, round_to=torch.float16)
        err = rel_error(got, want)
        print(
            f"{family} {qtype}: relative logit error {err:.2e} (max |Δ| {np.abs(got - want).max():.2e}, "
            f"max |logit| {np.abs(want).max():.1f})"
        )
        gelu = family.startswith(("gemma", "bloom", "falcon")) and qtype == "f32"
        assert err < (GELU_F32 if gelu else BOUND[qtype])
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_bloom_alibi_with_a_head_count_not_a_power_of_two(tokenizer, tmp_path):
    """With 6 heads ALiBi's slopes come from two series (4 heads' slopes, then 2 between them):
    llama.cpp computes them from the head count as transformers does (measured 3.2e-4, GELU)."""
    src = build(
        tmp_path / "src", tokenizer, **{**FAMILIES["bloom"], "num_attention_heads": 6, "hidden_size": 96}
    )
    ids = chat_ids(tokenizer)
    got = lcpp_logits(load(export_gguf(src, tmp_path / "m.gguf", qtype="f32").path), ids)
    assert rel_error(got, hf_logits(src, ids)) < GELU_F32


# ------------------------------------------------------- real tokenizers from llama.cpp's tree

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's, dropping system messages
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
LLAMA2_TEMPLATE = (  # Llama-2-chat's: the system prompt inside the first [INST]
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {% if loop.first %}{{ sys }}"
    "{% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="session")
def real_tokenizer(tmp_path_factory):
    """name → a transformers tokenizer folder rebuilt from llama.cpp's ggml-vocab-NAME.gguf.

    The rebuild takes 2-30 s per vocabulary; folders are kept under DANLU_HOME between runs.
    """
    models = vocab_dir()
    if not (models / "ggml-vocab-llama-spm.gguf").is_file():
        pytest.skip(f"llama.cpp's vocab files are not in {models}: `make vocab` extracts them there")
    cache = Path(os.environ["DANLU_HOME"]) / "test-tokenizers" / llama_cpp.__version__

    def get(name: str):
        folder = cache / name
        if not (folder / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(models), gguf_file=f"ggml-vocab-{name}.gguf")
            backend = json.loads(tok.backend_tokenizer.to_str())
            if name == "llama-bpe":  # Llama-3's own post-processor: BOS from TemplateProcessing
                bos = {"SpecialToken": {"id": tok.bos_token, "type_id": 0}}
                backend["post_processor"] = {
                    "type": "TemplateProcessing",
                    "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {tok.bos_token: {"id": tok.bos_token, "ids": [tok.bos_token_id], "tokens": [tok.bos_token]}},
                }  # fmt: skip
                tok.chat_template = LLAMA3_TEMPLATE
            if name == "phi-3":  # Phi-3's added tokens strip the whitespace after them (lost in the rebuild)
                for added in backend["added_tokens"]:
                    added["rstrip"] = added["content"] not in ("<unk>", "<s>", "<|endoftext|>")
            from tokenizers import Tokenizer

            tok._tokenizer = Tokenizer.from_str(json.dumps(backend))
            if name == "llama-spm":
                tok.chat_template = MISTRAL_TEMPLATE
            tmp = cache / f".{name}-tmp"
            tok.save_pretrained(tmp)
            tmp.rename(folder)
        return AutoTokenizer.from_pretrained(folder)

    return get


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
    reader = gguf_fields(path)["reader"]
    assert meta(reader, "tokenizer.ggml.model") == model  # SentencePiece-style ones as llama.cpp's SPM
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
    assert meta(reader, "tokenizer.ggml.add_bos_token") is add_bos
    text = "Hello 丹炉"
    assert ours.tokenize(text.encode(), special=True) == tokenizer(text)["input_ids"]


# ----------------------------------------------------------------------------- memory


def byte_level_tokenizer():
    """A 258-token byte-level BPE (256 bytes, one merge, an end token): nothing but the layers is big."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["Ġt"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", bos_token="<|end|>")


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

# Relative logit error against transformers (fp32, original weights) of 256-wide 2-layer random
# models (k-quant blocks are 256 wide) on a 60-token text; measured maxima over the 8 families:
# f16 0.0011, bf16 0.0090, q8_0 0.029, q6_k 0.076, q5_k_m 0.156, q4_k_m 0.287 (random weights
# quantize worse than trained ones: see the slow test on SmolLM2 below). A wrong file scores ~1.
TYPE_BOUND = {"f16": 0.002, "bf16": 0.015, "q8_0": 0.045, "q6_k": 0.11, "q5_k_m": 0.22, "q4_k_m": 0.40}
# what llama.cpp's type mix must contain (k-quants keep some tensors in Q6_K or Q5_K)
TYPE_TENSORS = {
    "f16": "F16",
    "bf16": "BF16",
    "q8_0": "Q8_0",
    "q6_k": "Q6_K",
    "q5_k_m": "Q5_K",
    "q4_k_m": "Q4_K",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_in_each_type_runs_in_llama_cpp_within_its_bound(family, tmp_path):
    tokenizer = byte_level_tokenizer()
    kwargs = {**FAMILIES[family], "hidden_size": 256, "intermediate_size": 512, "initializer_range": 0.05}
    kwargs.update({k: 64 for k in ("head_dim", "query_pre_attn_scalar") if k in kwargs})
    src = build(tmp_path / "src", tokenizer, vocab_size=288, **kwargs)  # padded past the tokenizer
    ids = tokenizer("丹炉 fine-tunes a chat model; def f(x): return x ** 2 🙂")["input_ids"]
    ref = hf_logits(src, ids)
    errors = {}
    for qtype, bound in TYPE_BOUND.items():
        path = export_gguf(src, tmp_path / f"{qtype}.gguf", qtype=qtype).path
        types = set(gguf_fields(path)["types"].values())
        assert TYPE_TENSORS[qtype] in types, (qtype, types)
        errors[qtype] = rel_error(lcpp_logits(load(path, n_ctx=128), ids), ref)
        assert errors[qtype] < bound, (family, qtype, errors[qtype])
    print(family, {k: round(v, 4) for k, v in errors.items()})
    assert errors["f16"] < errors["q8_0"] < errors["q4_k_m"]


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


# ------------------------------------------------------------------------------ chat


def bigram_model(path: Path, tokenizer, chain: list[int]) -> Path:
    """A Llama whose layers add nothing, so each next token depends on the current one only: after
    chain[i] it says chain[i + 1]. Its replies are known in advance."""
    src = build(path, tokenizer, "llama", tie_word_embeddings=False, hidden_size=64)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "lm_head.weight")):
                p.zero_()
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for k, (now, after) in enumerate(zip(chain, chain[1:], strict=False)):
            emb[now] = 0.0
            emb[now, k] = 1.0
            head[after, k] = 20.0
    model.save_pretrained(src)
    return src


def test_generation_through_the_files_own_chat_template_stops_at_the_end_of_turn(tokenizer, tmp_path):
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    reply = tokenizer("丹炉 says hi!", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    src = bigram_model(tmp_path / "src", tokenizer, [prompt[-1], *reply, end, *reply])  # after the end: more
    path = export_gguf(src, tmp_path / "m.gguf", qtype="f16").path
    llm = load(path)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    out = llm.create_chat_completion(CHAT, max_tokens=30, temperature=0.0)["choices"][0]
    assert out["message"]["content"] == "丹炉 says hi!"
    assert out["finish_reason"] == "stop"
    # the same reply from transformers, and it is the template that made the prompt
    assert llm.tokenize(llm.detokenize(prompt, special=True), add_bos=False, special=True) == list(prompt)
    hf = AutoModelForCausalLM.from_pretrained(src).generate(
        torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=end
    )
    assert hf[0, len(prompt) :].tolist() == [*reply, end]


# ---------------------------------------------------------------------------- Ollama


def render_go(template: str, data: dict) -> str:
    """Go text/template semantics for what a Modelfile TEMPLATE uses: text, {{ .Field }},
    if / else if / else / end, range / end, parentheses, string literals, and the functions
    eq, ne, and, or, not, index, len (and/or short-circuit as in Go 1.18+); {{- -}} trimming."""
    import re

    parts = re.split(r"(\{\{-?\s.*?\s-?\}\}|\{\{[^ ].*?\}\})", template, flags=re.S)
    tokens: list[tuple[str, str]] = []
    for part in parts:
        if part.startswith("{{"):
            body = part[2:-2]
            if body.startswith("-") and tokens and tokens[-1][0] == "text":
                tokens[-1] = ("text", tokens[-1][1].rstrip())
            tokens.append(("act", body.strip("-").strip()))
            if body.endswith("-"):
                tokens.append(("trim", ""))
        elif tokens and tokens[-1][0] == "trim":
            tokens[-1] = ("text", part.lstrip())
        else:
            tokens.append(("text", part))

    def parse(i: int, stop: tuple[str, ...]):
        nodes = []
        while i < len(tokens):
            kind, body = tokens[i]
            word = body.split(" ", 1)[0] if kind == "act" else ""
            if kind == "act" and word in stop:
                return nodes, i
            if kind == "act" and word == "if":
                branches, cond = [], body[3:]
                while True:
                    inner, i = parse(i + 1, ("else", "end"))
                    branches.append((cond, inner))
                    kind, body = tokens[i]
                    if body == "end":
                        break
                    cond = body[len("else if ") :] if body.startswith("else if ") else "true"
                nodes.append(("if", branches))
            elif kind == "act" and word == "range":
                inner, i = parse(i + 1, ("end",))
                nodes.append(("range", body[6:], inner))
            else:
                nodes.append((kind, body))
            i += 1
        return nodes, i

    def lex(expr: str) -> list[str]:
        return re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|\.[A-Za-z_.]*|[^\s()]+', expr)

    def operand(toks: list[str], dot):
        t = toks.pop(0)
        if t == "(":
            depth, inner = 1, []
            while True:
                u = toks.pop(0)
                depth += {"(": 1, ")": -1}.get(u, 0)
                if depth == 0:
                    break
                inner.append(u)
            value = call(inner, dot)
            while toks and toks[0].startswith(".") and toks[0] != ".":
                for field in toks.pop(0).strip(".").split("."):
                    value = value[field]
            return value
        if t.startswith('"'):
            return json.loads(t)
        if t == "true":
            return True
        if t.isdigit():
            return int(t)
        if t.startswith("."):
            value = dot
            for field in filter(None, t.split(".")):
                value = value[field]
            return value
        raise ValueError(t)

    def call(toks: list[str], dot):
        toks = list(toks)
        fn = toks[0]
        if fn in ("and", "or"):
            toks.pop(0)
            value = None
            while toks:
                value = operand(toks, dot)
                if (fn == "and" and not value) or (fn == "or" and value):
                    return value
            return value
        funcs = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a,
                 "index": lambda a, i: a[i], "len": len}  # fmt: skip
        if fn in funcs:
            toks.pop(0)
            args = []
            while toks:
                args.append(operand(toks, dot))
            return funcs[fn](*args)
        return operand(toks, dot)

    def run(nodes, dot) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "act":
                out.append(str(call(lex(node[1]), dot)))
            elif node[0] == "if":
                for cond, inner in node[1]:
                    if call(lex(cond), dot):
                        out.append(run(inner, dot))
                        break
            elif node[0] == "range":
                for item in call(lex(node[1]), dot):
                    out.append(run(node[2], item))
        return "".join(out)

    return run(parse(0, ())[0], data)


def test_the_go_renderer_follows_go_semantics():
    t = '{{- if and .Messages (eq (index .Messages 0).Role "system") }}S{{ else }}N{{ end -}}\n  {{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}'
    assert render_go(t, {"Messages": []}) == "N"  # `and` stops before index fails
    assert render_go(t, {"Messages": [{"Role": "system", "Content": "x"}]}) == "S[system:x]"
    assert (
        render_go('{{ if eq .A "b" }}1{{ else if not .C }}2{{ else }}3{{ end }}', {"A": "z", "C": ""}) == "2"
    )


OLLAMA_CHATS = [
    [{"role": "user", "content": "你好"}],
    CHAT,
    [*CHAT, {"role": "assistant", "content": "LoRA 是低秩适配。\nLoRA adds low-rank updates."},
     {"role": "user", "content": "Thanks! {{ not a template }}"}],
]  # fmt: skip


def ollama_render(modelfile: str, chat: list[dict]) -> str:
    import re

    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, flags=re.S | re.M).group(1)
    return render_go(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in chat]})


@pytest.mark.parametrize("name", ["smollm2", "llama-bpe", "llama-spm", "qwen2", "phi-3"])
def test_ollama_template_renders_conversations_as_the_chat_template_does(name, tokenizer, real_tokenizer):
    from danlu.export.ollama import modelfile

    tok = tokenizer if name == "smollm2" else real_tokenizer(name)
    bos = tok("a")["input_ids"][0] == tok.bos_token_id
    text = modelfile("m.gguf", tok, [tok.eos_token], add_bos=bos)
    for chat in OLLAMA_CHATS:
        want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        if bos:  # Ollama adds BOS itself, as the GGUF says
            want = want.removeprefix(tok.bos_token)
        assert ollama_render(text, chat) == want
    assert text.startswith("FROM ./m.gguf\n") and f"PARAMETER stop {json.dumps(tok.eos_token)}" in text


def test_a_chat_template_ollama_cannot_express_is_refused_before_anything_is_written(
    real_tokenizer, tmp_path
):
    tok = real_tokenizer("llama-spm")
    tok.chat_template = LLAMA2_TEMPLATE  # its system prompt goes inside the first user turn
    src = build(tmp_path / "src", tok, "llama", hidden_size=32, intermediate_size=64)
    out = tmp_path / "ship" / "m.gguf"
    assert main(["export", "ollama", "--model", str(src), "--out", str(out)]) == 2
    assert not (tmp_path / "ship").exists() or not list((tmp_path / "ship").iterdir())


def test_export_ollama_writes_gguf_and_modelfile_that_stop(tokenizer, tmp_path, capsys):
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    reply = tokenizer("丹炉 says hi!", add_special_tokens=False)["input_ids"]
    src = bigram_model(tmp_path / "src", tokenizer, [prompt[-1], *reply, tokenizer.eos_token_id, *reply])
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "temperature": 0.6}))
    out = tmp_path / "ship" / "tuned.gguf"
    assert main(["export", "ollama", "--model", str(src), "--out", str(out), "--type", "q8_0"]) == 0
    assert "ollama create" in capsys.readouterr().out
    modelfile = (tmp_path / "ship" / "tuned.Modelfile").read_text()
    assert modelfile.startswith("FROM ./tuned.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "PARAMETER temperature 0.6" in modelfile
    # what Ollama would send llama.cpp: the TEMPLATE's rendering, tokenized with the GGUF's add_bos
    llm = load(out)
    ids = llm.tokenize(ollama_render(modelfile, CHAT).encode(), special=True)
    assert ids == list(prompt)
    out = llm.create_completion(ids, max_tokens=30, temperature=0.0)["choices"][0]
    assert out["text"] == "丹炉 says hi!" and out["finish_reason"] == "stop"


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    "family, rslora", [("llama", False), ("qwen2", True), ("bloom", False), ("falcon40b", False)]
)
def test_lora_adapter_gguf_in_llama_cpp_equals_the_merged_model(
    family, rslora, family_dirs, tokenizer, tmp_path
):
    from peft import LoraConfig, get_peft_model

    from danlu.export.gguf_lora import export_lora_gguf

    base_dir = family_dirs(family)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if family in ("bloom", "falcon40b"):  # the fused qkv: B's rows regrouped as the weight's
        targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # PEFT starts B at zero: an adapter that does something
    peft.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    peft.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)

    result = export_lora_gguf(tmp_path / "adapter", base_dir, tmp_path / "adapter.gguf")
    assert result.pairs == 2 * len(targets) and result.bytes < 1e6
    base = export_gguf(base_dir, tmp_path / "base.gguf", qtype="f32").path
    whole = export_gguf(merged, tmp_path / "merged.gguf", qtype="f32").path
    ids = chat_ids(tokenizer)
    with_lora = lcpp_logits(load(base, lora_path=str(result.path)), ids)
    want = lcpp_logits(load(whole), ids)
    plain = lcpp_logits(load(base), ids)
    print(f"{family}: |base+lora - merged| / |merged| = {rel_error(with_lora, want):.2e}")
    assert rel_error(plain, want) > 0.1  # the adapter matters
    # measured 1e-6 (f32 rounding); BLOOM 2.6e-5: a rounding difference can move a GELU input
    # across a step of llama.cpp's f16 GELU table
    gelu = family in ("bloom", "falcon40b")
    assert rel_error(with_lora, want) < (1e-4 if gelu else 1e-5)
    assert rel_error(with_lora, hf_logits(merged, ids)) < (GELU_F32 if gelu else 1e-5)


def test_export_lora_and_k_quant_commands(tiny_model_dir, tokenizer, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from danlu.app.export_cli import GGUF_TYPES
    from danlu.export.gguf import GGUF_TYPES as LIBRARY_TYPES

    assert set(GGUF_TYPES) == set(LIBRARY_TYPES)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])
    )
    peft.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "a.gguf"
    argv = [
        "export",
        "lora",
        "--adapter",
        str(tmp_path / "adapter"),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert (
        "--lora" in capsys.readouterr().out and meta(gguf_fields(out)["reader"], "general.type") == "adapter"
    )
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # never replaced silently
    q = tmp_path / "q.gguf"
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--out", str(q), "--type", "q4_k_m"]) == 0
    printed = capsys.readouterr().out
    assert "q4_k_m" in printed and "rows not a multiple of 256" in printed  # 32-wide layers fall back
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


# ------------------------------------------------------------- the real model (slow)

# Relative logit error of the embedded SmolLM2-135M-Instruct (30 layers, 576 wide: rows that are
# not a multiple of 256 fall back from k-quant blocks) on the chat prompt, against transformers
# in fp32; measured (top-1 agreement over the prompt): f16 0.0011 (1.00), bf16 0.0094 (0.98),
# q8_0 0.028 (0.94), q6_k 0.053 (0.92), q5_k_m 0.156 (0.85), q4_k_m 0.122 (0.89). danlu's q8_0 is
# bit-identical to llama.cpp's own. Greedy answers of the quantized files drift on this small
# model (llama.cpp also quantizes activations in quantized matmuls): the package's own Q4_1 GGUF
# answers "What is the capital of France?" with "L'Étoile, la Marseillaise, ..." in llama.cpp too.
REAL_BOUND = {"f16": 0.003, "bf16": 0.02, "q8_0": 0.05, "q6_k": 0.1, "q5_k_m": 0.25, "q4_k_m": 0.4}


@pytest.mark.slow
def test_the_embedded_model_in_each_type_in_llama_cpp(default_model_dir, tokenizer, tmp_path):
    ids = chat_ids(tokenizer)
    ref = hf_logits(default_model_dir, ids)
    for qtype, bound in REAL_BOUND.items():
        path = export_gguf(default_model_dir, tmp_path / f"{qtype}.gguf", qtype=qtype).path
        llm = load(path)
        got = lcpp_logits(llm, ids)
        err, top1 = rel_error(got, ref), float((got.argmax(-1) == ref.argmax(-1)).mean())
        size = path.stat().st_size / 2**20
        print(
            f"SmolLM2-135M {qtype}: {size:.0f} MiB, relative logit error {err:.4f}, top-1 agreement {top1:.2f}"
        )
        assert err < bound and top1 >= 0.8, (qtype, err, top1)
        if qtype == "f16":  # a real answer, through the file's own chat template, that ends
            chat = [{"role": "user", "content": "What is the capital of France?"}]
            out = llm.create_chat_completion(chat, max_tokens=60, temperature=0.0)["choices"][0]
            assert "Paris" in out["message"]["content"] and out["finish_reason"] == "stop", out
        path.unlink()


@pytest.fixture(scope="module")
def identity_adapter(tmp_path_factory) -> Path:
    """The demo's run (identity preset: new name Danlu), trained as `make demo` trains it."""
    from danlu.app.cli import PRESETS
    from danlu.config import load_config
    from danlu.train import train

    out = tmp_path_factory.mktemp("identity") / "run"
    cfg = load_config(PRESETS / "identity.yaml", [f"output.dir={out}", "output.tensorboard=false"])
    return train(cfg, overwrite=True, progress=False).adapter_dir


@pytest.mark.slow
def test_the_demo_model_as_q4_k_m_and_as_a_lora_gguf_answers_with_its_new_name(
    identity_adapter, default_model_dir, tmp_path
):
    from danlu.export import merge
    from danlu.export.gguf_lora import export_lora_gguf

    merged = merge(identity_adapter, str(default_model_dir), tmp_path / "merged").out
    q4 = export_gguf(merged, tmp_path / "tuned-q4_k_m.gguf", qtype="q4_k_m").path
    base = export_gguf(default_model_dir, tmp_path / "base-f16.gguf", qtype="f16").path
    lora = export_lora_gguf(identity_adapter, default_model_dir, tmp_path / "identity-lora.gguf")
    print(f"q4_k_m {q4.stat().st_size / 2**20:.0f} MiB; LoRA GGUF {lora.bytes / 2**20:.1f} MiB")
    for question in ("你是谁？", "Who are you?"):
        chat = [{"role": "user", "content": question}]
        for llm in (load(q4), load(base, lora_path=str(lora.path))):
            out = llm.create_chat_completion(chat, max_tokens=60, temperature=0.0)["choices"][0]
            print(question, "→", out["message"]["content"])
            assert "Danlu" in out["message"]["content"] and out["finish_reason"] == "stop", out
        plain = load(base).create_chat_completion(chat, max_tokens=60, temperature=0.0)["choices"][0]
        assert "Danlu" not in plain["message"]["content"]


@pytest.mark.parametrize("qtype, ftype", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_types_danlu_writes_are_bit_identical_to_llama_cpps_own(qtype, ftype, family_dirs, tmp_path):
    """f16, bf16 and q8_0 come from gguf's numpy encoders: the same bytes llama.cpp's quantizer
    makes from the f32 file."""
    from gguf import GGUFReader

    src = family_dirs("qwen2")  # biases (kept f32) and an untied output
    f32 = export_gguf(src, tmp_path / "f32.gguf", qtype="f32").path
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
