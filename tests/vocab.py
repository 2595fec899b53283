"""Real tokenizers without a model hub, and tiny random models of each family around them.

llama.cpp keeps vocab-only GGUF files of many families (``ggml-vocab-*.gguf``, with tokenizer test
vectors ``.inp``/``.out``) and the chat templates models ship (``templates/*.jinja``) in its
``models/`` folder; the ``llama-cpp-python`` source distribution on PyPI vendors it. ``make vocab``
downloads that pinned sdist once and extracts just those files into :data:`VOCAB_DIR`.

transformers builds a tokenizer from such a file (``AutoTokenizer.from_pretrained(folder,
gguf_file=...)``), but a GGUF does not carry everything the family's ``tokenizer.json`` says: the
few differences that the test vectors show are put back here (:data:`SHIPPED`), so each converted
tokenizer encodes every one of llama.cpp's test vectors as the family's own tokenizer does
(checked by ``tests/test_family_matrix.py``). Converted tokenizers are kept under
``VOCAB_DIR/hf/transformers-VERSION/`` so only the first run pays for the conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VOCAB_DIR = Path(os.environ.get("DANLU_VOCAB_DIR", ROOT / "build" / "vocab"))
SDIST = "llama-cpp-python==0.3.36"
SEPARATOR = "\n__ggml_vocab_test__\n"  # between the inputs of a .inp file; .out has one line of ids each


def missing() -> str | None:
    """Why the vocab files cannot be used here, or None when they are in place."""
    if not (VOCAB_DIR / "ggml-vocab-qwen2.gguf").is_file():
        return f"no llama.cpp vocab files in {VOCAB_DIR}: run `make vocab` (downloads {SDIST}'s sdist from PyPI once)"
    return None


def vectors(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for ``ggml-vocab-VOCAB.gguf``: (text, ids without BOS)."""
    base = VOCAB_DIR / f"ggml-vocab-{vocab}.gguf"
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    if texts and texts[-1] == "":
        texts = texts[:-1]
    lines = Path(f"{base}.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines, strict=False)]


# ------------------------------------------------------------------- what the GGUF leaves out

# Llama-2's tokenizer.json: a "▁" before the text and for every space, no pre-tokenizer (a GGUF
# converted by transformers gets Metaspace instead, which splits leading and repeated spaces
# differently: 15 of llama.cpp's 46 vectors).
_LLAMA2_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}
# Falcon's tokenizer.json splits punctuation and runs of three digits before the byte-level step.
_FALCON_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Punctuation", "behavior": "Contiguous"},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        {"type": "Digits", "individual_digits": False},
        {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False},
    ],
}


def _llama2(tok: dict[str, Any]) -> None:
    tok["normalizer"], tok["pre_tokenizer"] = _LLAMA2_NORMALIZER, None


def _llama3(tok: dict[str, Any]) -> None:
    tok["model"]["ignore_merges"] = True  # Llama-3 takes a word that is in the vocabulary whole


def _falcon(tok: dict[str, Any]) -> None:
    tok["pre_tokenizer"] = _FALCON_PRE_TOKENIZER


def _qwen2(tok: dict[str, Any]) -> None:
    tok["normalizer"] = {"type": "NFC"}  # as Qwen2's tokenizer.json (and transformers' Qwen2Tokenizer)


SHIPPED: dict[str, Callable[[dict[str, Any]], None]] = {
    "llama-spm": _llama2,
    "llama-bpe": _llama3,
    "falcon": _falcon,
    "qwen2": _qwen2,
}


def tokenizer_dir(vocab: str) -> Path:
    """A folder with the Hugging Face tokenizer of ``ggml-vocab-VOCAB.gguf`` (converted once)."""
    import transformers

    target = VOCAB_DIR / "hf" / f"transformers-{transformers.__version__}" / vocab
    if (target / "tokenizer.json").is_file():
        return target
    tokenizer = convert(VOCAB_DIR / f"ggml-vocab-{vocab}.gguf", vocab)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{vocab}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(path: Path, vocab: str) -> Any:
    """The tokenizer of a GGUF file (llama.cpp's, or one danlu wrote) holding ``vocab``'s vocabulary:
    transformers' conversion, called directly (``AutoTokenizer.from_pretrained(folder, gguf_file=)``
    builds the same tokenizer but first parses the whole file with gguf-py: 10-20 s for a 150k
    vocabulary, and it fails on Gemma 4's model config), plus what :data:`SHIPPED` puts back."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    arch, tokenizer_dict, config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    tok = json.loads(backend.to_str())
    # the byte-level builder adds its default '<|endoftext|>' past a vocabulary that lacks it
    # (Llama-3: 128,257 tokens instead of 128,256)
    size = len(tokenizer_dict["tokens"])
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["id"] < size]
    if vocab in SHIPPED:
        SHIPPED[vocab](tok)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tok)), **config)


# ------------------------------------------------------------------------- the families


@dataclass(frozen=True)
class Family:
    """One model family as a user brings it: architecture, tokenizer, chat template, stop ids.

    ``vocab``: the llama.cpp vocab file (None: the embedded default model's tokenizer).
    ``template``: ``"own"`` (the tokenizer's: the one the vocab file carries), ``"file:NAME.jinja"``
    (llama.cpp's copy of the template the model ships) or a danlu template name (``data.template``). ``stops``: ``eos_token_id`` of the generation_config.json the family ships.
    ``turn_end``: the token that closes an assistant turn, which every stage must stop on.
    """

    key: str
    name: str
    arch: str
    vocab: str | None
    template: str
    stops: list[int]
    turn_end: str
    config: Callable[[int, Any], Any] = field(repr=False)
    note: str = ""

    @property
    def named_template(self) -> str | None:
        """The ``data.template`` value, when the family's template is one of danlu's names."""
        return None if self.template == "own" or self.template.startswith("file:") else self.template


SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.5)
LLAMA_LIKE = dict(SIZES, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=512)


def _ids(tok: Any) -> dict[str, int | None]:
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _llama(vocab: int, tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, **LLAMA_LIKE, **_ids(tok))


def _llama3_config(vocab: int, tok: Any) -> Any:
    from transformers import LlamaConfig

    rope = {  # Llama-3.1's, as its config.json has it
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    sizes = dict(LLAMA_LIKE, max_position_embeddings=131072)
    return LlamaConfig(vocab_size=vocab, rope_parameters=rope, **sizes, **_ids(tok))


def _qwen2(vocab: int, tok: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **LLAMA_LIKE, **_ids(tok))


def _qwen3(vocab: int, tok: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, head_dim=8, tie_word_embeddings=True, **LLAMA_LIKE, **_ids(tok))


def _phi3(vocab: int, tok: Any) -> Any:
    from transformers import Phi3Config

    return Phi3Config(vocab_size=vocab, **LLAMA_LIKE, **_ids(tok))


def _mistral(vocab: int, tok: Any) -> Any:
    from transformers import MistralConfig

    # v0.2 and later: no sliding window (v0.1's 4096 window takes the plain decoder)
    return MistralConfig(vocab_size=vocab, sliding_window=None, **LLAMA_LIKE, **_ids(tok))


def _gemma4(vocab: int, tok: Any) -> Any:
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        vocab_size=vocab, head_dim=8, global_head_dim=8, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=vocab, **LLAMA_LIKE, **_ids(tok),
    )  # fmt: skip


def _bloom(vocab: int, tok: Any) -> Any:
    from transformers import BloomConfig

    return BloomConfig(
        vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.5, **_ids(tok)
    )


def _falcon_config(vocab: int, tok: Any) -> Any:
    from transformers import FalconConfig

    # Falcon-7B's shape: multi-query attention, attention and MLP in parallel, rotary positions
    return FalconConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        parallel_attn=True, alibi=False, initializer_range=0.5, max_position_embeddings=512, **_ids(tok),
    )  # fmt: skip


FAMILIES = [
    Family("llama2", "Llama-2", "LlamaForCausalLM", "llama-spm", "llama2", [2], "</s>", _llama),
    Family(
        "llama3", "Llama-3.1", "LlamaForCausalLM", "llama-bpe",
        template="file:meta-llama-Llama-3.1-8B-Instruct.jinja",
        stops=[128001, 128008, 128009], turn_end="<|eot_id|>", config=_llama3_config,
    ),
    Family(
        "qwen2.5", "Qwen2.5", "Qwen2ForCausalLM", "qwen2", template="file:Qwen-Qwen2.5-7B-Instruct.jinja",
        stops=[151645, 151643], turn_end="<|im_end|>", config=_qwen2,
    ),
    Family(
        "qwen3", "Qwen3", "Qwen3ForCausalLM", "qwen2", template="file:Qwen-Qwen3-0.6B.jinja",
        stops=[151645, 151643], turn_end="<|im_end|>", config=_qwen3,
        note="`<think>` is spelled in pieces: the vocab file predates Qwen3's added tokens",
    ),
    Family("phi3", "Phi-3", "Phi3ForCausalLM", "phi-3", "own", [32000, 32001, 32007], "<|end|>", _phi3),
    Family(
        "mistral", "Mistral", "MistralForCausalLM", "llama-spm", "mistral", [2], "</s>", _mistral,
        note="Llama-2's SentencePiece vocabulary stands in for Mistral's (same kind; Mistral's is not in the set)",
    ),
    Family("gemma4", "Gemma 4", "Gemma4ForCausalLM", "gemma-4", "own", [1, 106], "<turn|>", _gemma4),
    Family(
        "bloom", "BLOOM (seed 000)", "BloomForCausalLM", None, "own", [], "<|im_end|>", _bloom,
        note="SmolLM2's tokenizer and ChatML template stand in (BLOOM's vocabulary is not in the set)",
    ),
    Family("falcon", "Falcon", "FalconForCausalLM", "falcon", "alpaca", [11], "<|endoftext|>", _falcon_config),
]  # fmt: skip


def build(family: Family, path: Path, default_tokenizer_dir: Path) -> int:
    """The family's tiny random model with its tokenizer, template and generation config, saved at
    ``path``; returns the id of the token that ends an assistant turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = tokenizer_dir(family.vocab) if family.vocab else default_tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(source)
    if family.template.startswith("file:"):
        tokenizer.chat_template = (VOCAB_DIR / "templates" / family.template[5:]).read_text(encoding="utf-8")
    config = family.config(len(tokenizer), tokenizer)
    config.architectures = [family.arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == family.arch, type(model).__name__
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if family.stops:
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=family.stops,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(path)
    return tokenizer.convert_tokens_to_ids(family.turn_end)
