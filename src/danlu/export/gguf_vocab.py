"""The tokenizer half of a GGUF file: ``tokenizer.ggml.*`` read from a model folder's tokenizer.

Two kinds of ``tokenizer.json`` reach llama.cpp's two BPE-like tokenizers:

- byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM, BLOOM, Falcon): ``gpt2`` with the merges and the name of the
  pre-split regex llama.cpp knows it by;
- SentencePiece-style BPE with byte fallback (Llama-2, Mistral, Phi-3, Gemma): ``llama`` (SPM),
  whose merge order lives in token scores, so each piece scores minus the rank of the first merge
  that makes it; ``<0xNN>`` pieces are byte tokens.

Special-token ids, merges and the chat template come from ``gguf.vocab.SpecialVocab``; what
transformers actually does is measured on the loaded tokenizer where files can disagree with it:
whether BOS/EOS are added (transformers 5 leaves ``add_bos_token`` False when the post-processor
adds BOS, as Llama-3's does), and which tokens are special.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from danlu.errors import UserError

log = logging.getLogger(__name__)

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# llama.cpp's names for pre-split regexes it implements, preferred over the aliases transformers
# lists for the same regex (llama.cpp refuses names it does not know).
LLAMA_CPP_PRE_NAMES = ("llama-bpe", "qwen2", "gpt-4o", "tekken")
# Pre-split regexes llama.cpp implements that transformers' table lacks, as tokenizer.json spells them:
# BLOOM's (llama.cpp's 'bloom' regex writes the same character class without the nested brackets)
LLAMA_CPP_MORE_SPLITS = {" ?[^(\\s|[.,!?…。，、।۔،])]+": "bloom"}
# Falcon's tokenizer.json: punctuation runs, GPT-2's byte-level regex, digits, runs of three digits
FALCON_STEPS = ["Punctuation", "ByteLevel", "Digits", "Split"]


def tokenizer_kind(tok: dict[str, Any]) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (SentencePiece-style BPE) for a parsed tokenizer.json."""
    model = tok.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(tok.get("decoder")):
        return "gpt2"
    return ""


def pre_tokenizer_name(tok: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-split regex ('gpt-2' for plain byte-level)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    regexes = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    digits = [s for s in steps if s.get("type") == "Digits" and s.get("individual_digits")]
    bytelevel = [s for s in steps if s.get("type") == "ByteLevel"]
    if [s.get("type") for s in steps] == FALCON_STEPS and regexes == ["[0-9][0-9][0-9]"]:
        return "falcon"
    if len(regexes) == 1 and regexes[0] in LLAMA_CPP_MORE_SPLITS and len(steps) == 2:
        if bytelevel and not bytelevel[0].get("use_regex", True):  # the split alone, then bytes
            return LLAMA_CPP_MORE_SPLITS[regexes[0]]
    if len(regexes) == 1:
        known = [n for n, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regexes[0]]
        for name in LLAMA_CPP_PRE_NAMES:
            if name in known:
                return name
        if known:
            return known[0]
    if not regexes and len(bytelevel) == 1 and bytelevel[0].get("use_regex", True):
        if digits and len(steps) == 2:
            return "smollm"  # individual digits, then GPT-2's regex
        if len(steps) == 1:
            return "gpt-2"
    raise UserError(
        "the tokenizer's pre-tokenizer is not one llama.cpp implements under a known name; "
        "use llama.cpp's convert_hf_to_gguf.py, which identifies it by hash"
    )


def add_space_prefix(tok: dict[str, Any]) -> bool:
    """Whether the SentencePiece-style tokenizer puts '▁' before the text (Llama-2: yes; Gemma: no)."""
    text = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    metaspace = re.search(r'"prepend_scheme": "(\w+)"', text)
    return bool(metaspace and metaspace.group(1) in ("first", "always"))


def merge_scores(tok: dict[str, Any], vocab: dict[str, int]) -> dict[int, float]:
    """SPM scores from BPE merges: a piece scores minus the rank of the first merge that makes it."""
    scores: dict[int, float] = {}
    for rank, merge in enumerate(tok["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and i not in scores:
            scores[i] = -float(rank)
    return scores


def added_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a plain text adds BOS / EOS: measured, whatever the attributes say."""
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(ids) > len(plain) and bos is not None and ids[0] == bos
    add_eos = len(ids) > len(plain) and eos is not None and ids[-1] == eos
    return add_bos, add_eos


def stop_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """The end-of-turn ids besides EOS: generation_config.json's eos_token_id list."""
    path = model_dir / "generation_config.json"
    ids: list[int] = []
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return [i for i in ids if i != tokenizer.eos_token_id]


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* plus the chat template and special ids; returns what was written."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tok = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = tokenizer_kind(tok)
    if not kind:
        raise UserError(
            f"--model {model_dir}: a {tok.get('model', {}).get('type')} tokenizer without byte-level BPE or "
            "byte fallback does not export here; use llama.cpp's convert_hf_to_gguf.py"
        )
    vocab = dict(tok["model"]["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    vocab.update({a["content"]: i for i, a in added.items()})
    by_id = {i: t for t, i in vocab.items()}
    scores = merge_scores(tok, vocab) if kind == "llama" else {}
    unk = tokenizer.unk_token_id
    tokens, types, token_scores = [], [], []
    for i in range(vocab_size):  # the embedding may be padded past the tokenizer's vocabulary
        token = by_id.get(i)
        if token is None:
            token, kind_i = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            kind_i = gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED
            if i == unk:
                kind_i = gguf.TokenType.UNKNOWN
        elif kind == "llama" and i == unk:
            kind_i = gguf.TokenType.UNKNOWN
        elif kind == "llama" and BYTE_PIECE.fullmatch(token):
            kind_i = gguf.TokenType.BYTE
        else:
            kind_i = gguf.TokenType.NORMAL
        tokens.append(token)
        types.append(kind_i)
        token_scores.append(scores.get(i, 0.0 if kind_i == gguf.TokenType.NORMAL else -1000.0))
    if len(vocab) > vocab_size:
        raise UserError(
            f"--model {model_dir}: the tokenizer has {len(vocab)} tokens but the embedding only {vocab_size} rows"
        )

    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(tok))
    else:
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(add_space_prefix(tok))
        writer.add_token_scores(token_scores)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=vocab_size)
    if kind == "gpt2" and not special.merges:
        raise UserError(f"--model {model_dir}: tokenizer.json has no merges")
    # what transformers does wins over what the files say
    for typ in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{typ}_token_id", None)
        if tid is not None and tid < vocab_size:
            special.special_token_ids[typ] = tid
    add_bos, add_eos = added_bos_eos(tokenizer)
    special.add_special_token.update(bos=add_bos, eos=add_eos)
    special.chat_template = tokenizer.chat_template or None
    stops = [i for i in stop_ids(model_dir, tokenizer) if i < vocab_size]
    if stops:  # end of turn: the stop token the chat template writes, else the first
        template = tokenizer.chat_template or ""
        written = [i for i in stops if tokenizer.convert_ids_to_tokens(i) in template]
        special.special_token_ids["eot"] = (written or stops)[0]
    special.add_to_gguf(writer, quiet=True)
    return {"model": kind, "tokenizer": tokenizer, "add_bos": add_bos, "stop_ids": stops}
