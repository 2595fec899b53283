"""The family matrix runs on real tokenizers: each one converted from llama.cpp's vocab files
(tests/vocab.py, ``make vocab``) is the family's own, as llama.cpp's test vectors show."""

from __future__ import annotations

import pytest

import vocab
from family_stages import read_gguf_metadata
from vocab import FAMILIES

MISSING = vocab.missing()
needs_vocab = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


# ------------------------------------------------------------------------ the real tokenizers


@needs_vocab
@pytest.mark.parametrize("name", sorted({f.vocab for f in FAMILIES if f.vocab}))
def test_converted_tokenizers_are_the_families_own(name):
    """Each converted tokenizer encodes every one of llama.cpp's test vectors for its vocabulary as
    the family's own tokenizer does (llama.cpp made them with it), keeps the file's special-token
    ids and has exactly the file's tokens: the matrix runs on real tokenizers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab.tokenizer_dir(name))
    cases = vocab.vectors(name)
    assert len(cases) >= 40
    wrong = [
        (text, ids) for text, ids in cases if tokenizer(text, add_special_tokens=False)["input_ids"] != ids
    ]
    assert not wrong, f"{len(wrong)} of {len(cases)} vectors differ, e.g. {wrong[:2]}"
    meta, _ = read_gguf_metadata(vocab.VOCAB_DIR / f"ggml-vocab-{name}.gguf")
    assert len(tokenizer) == len(meta["tokenizer.ggml.tokens"])
    assert tokenizer.bos_token_id == meta.get("tokenizer.ggml.bos_token_id")
    assert tokenizer.eos_token_id == meta.get("tokenizer.ggml.eos_token_id")
