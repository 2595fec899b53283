"""What the GGUF tests share: the texts and chat they check, tiny random models of each family,
real tokenizers rebuilt from llama.cpp's vocab files, and llama.cpp / transformers logits.

The tests judge `danlu export gguf` by llama.cpp itself (llama-cpp-python, built by `make
install`): tests/test_gguf.py (what the written file holds: tokenizers, types, memory, refusals),
tests/test_gguf_llamacpp.py (logits of each family and type, the embedded model),
tests/test_gguf_ollama.py (generation through the file's chat template, Ollama's Modelfile) and
tests/test_gguf_lora.py (LoRA adapters as GGUF). Tokenizers are real ones: SmolLM2's (the
embedded model), and Llama-2 (SentencePiece), Llama-3, Qwen2 and Phi-3 rebuilt by transformers
from the vocab-only GGUFs in llama.cpp's source tree (`make vocab`, part of `make test`, extracts
them into build/vocab/). Models are tiny and random.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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


def gguf_meta(path: Path) -> dict:
    """A GGUF's metadata, without the token and merge lists, read by transformers' fast reader
    (gguf-py's GGUFReader parses every token of a 128k vocabulary in Python: 6-8 s a file)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    return read_gguf_metadata(str(path))[0]


def gguf_types(path: Path) -> set[str]:
    """The tensor types of a GGUF (``F32``, ``Q4_K``, ...)."""
    from gguf import GGUFReader

    return {t.tensor_type.name for t in GGUFReader(str(path)).tensors}


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


@pytest.fixture(scope="session")
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

    The rebuild is transformers' own conversion, called directly: ``AutoTokenizer.from_pretrained(
    folder, gguf_file=...)`` makes the same tokenizer.json but first parses the whole file with
    gguf-py (9-12 s for Qwen2's and Llama-3's vocabularies, 1.3-1.7 s this way). Folders are kept
    under DANLU_HOME between runs.
    """
    models = vocab_dir()
    if not (models / "ggml-vocab-llama-spm.gguf").is_file():
        pytest.skip(f"llama.cpp's vocab files are not in {models}: `make vocab` extracts them there")
    cache = Path(os.environ["DANLU_HOME"]) / "test-tokenizers" / llama_cpp.__version__

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    def get(name: str):
        folder = cache / name
        if not (folder / "tokenizer.json").is_file():
            arch, vocabulary, special = get_gguf_tokenizer(str(models / f"ggml-vocab-{name}.gguf"))
            tok = PreTrainedTokenizerFast(
                tokenizer_object=convert_gguf_tokenizer(arch, vocabulary)[0], **special
            )
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
            tok._tokenizer = Tokenizer.from_str(json.dumps(backend))
            if name == "llama-spm":
                tok.chat_template = MISTRAL_TEMPLATE
            tmp = cache / f".{name}-tmp"
            tok.save_pretrained(tmp)
            tmp.rename(folder)
        return AutoTokenizer.from_pretrained(folder)

    return get


# ------------------------------------------------------------------ a byte-level tokenizer


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


# --------------------------------------------------------------------- a known reply


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
