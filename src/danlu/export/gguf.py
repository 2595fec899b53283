"""Convert a Hugging Face model folder (Llama family, Qwen2) into one GGUF file for llama.cpp.

Written with the ``gguf`` package the way llama.cpp's ``convert_hf_to_gguf.py`` does it:
architecture metadata under ``ARCH.*`` keys, tensors renamed by gguf's own name map, Llama's
q/k projections permuted into llama.cpp's rotary layout (transformers' GGUF loader undoes
exactly this permutation), ``output.weight`` left out when embeddings are tied, and the
byte-level BPE tokenizer with its chat template. Tensors are streamed from the safetensors
shards one at a time, so the model is never loaded as a whole.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from danlu.errors import UserError

log = logging.getLogger(__name__)

# HF architecture → (llama.cpp architecture, whether q/k are permuted for llama.cpp's rope).
# Mistral is written as 'llama', as llama.cpp itself does.
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
GGUF_TYPES = ("f16", "q8_0")


@dataclass
class GgufResult:
    """The written file and what went into it."""

    path: Path
    arch: str
    qtype: str
    tensors: int
    bytes: int


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's q/k row permutation (interleaved rotary halves), as in convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"--model {model_dir}: no config.json there; point it at a Hugging Face model folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(
            f"--model {model_dir}: cannot export {arch} to GGUF; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(
            f"--model {model_dir}: rope scaling '{rope.get('rope_type')}' is not supported by danlu's GGUF "
            "export; use llama.cpp's convert_hf_to_gguf.py"
        )
    return config


def iter_tensors(model_dir: Path):
    """(name, float32 numpy array) for every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    if not all((model_dir / f).is_file() for f in files):
        raise UserError(f"--model {model_dir}: no safetensors weights there (model.safetensors or an index)")
    for f in files:
        with safe_open(str(model_dir / f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def add_metadata(writer: Any, config: dict[str, Any], name: str, file_type: int) -> None:
    """Architecture metadata: the keys transformers' GGUF loader and llama.cpp read."""
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)


def pre_tokenizer_name(tok: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-split regex ('gpt-2' for plain byte-level)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        for known, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == split:
                return known
    if steps == [pre] and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    log.warning("unknown pre-tokenizer in tokenizer.json; writing 'default'")
    return "default"


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.* (byte-level BPE as 'gpt2') plus the chat template and special ids."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tok = json.loads(tokenizer.backend_tokenizer.to_str())
    if tok["model"]["type"] != "BPE":
        raise UserError(f"--model {model_dir}: only byte-level BPE tokenizers export to GGUF here")
    vocab = dict(tok["model"]["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    vocab.update({a["content"]: a["id"] for a in added.values()})
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may be padded past the tokenizer's vocabulary
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token]["special"] else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, key, None) is not None:
            add(getattr(tokenizer, key))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(
    model_dir: str | Path, out: str | Path, *, qtype: str = "f16", overwrite: bool = False
) -> GgufResult:
    """Write ``model_dir`` (a safetensors model folder) as one GGUF file at ``out``.

    ``qtype`` f16 stores 2-D weights in float16, q8_0 in llama.cpp's 8-bit blocks of 32;
    1-D tensors (norms, biases) stay float32, as llama.cpp does.
    """
    import gguf

    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser().resolve()
    if qtype not in GGUF_TYPES:
        raise UserError(f"--type {qtype}: choose one of {', '.join(GGUF_TYPES)}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it or choose another file")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: the file name should end in .gguf")
    config = read_config(model_dir)
    arch, permute = GGUF_ARCHITECTURES[config["architectures"][0]]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    tied = bool(config.get("tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    file_type = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        add_metadata(writer, config, model_dir.resolve().name, int(file_type))
        add_tokenizer(writer, model_dir, config["vocab_size"])
        count = 0
        for hf_name, data in iter_tensors(model_dir):
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reuses token_embd; transformers re-ties when output.weight is absent
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"--model {model_dir}: tensor {hf_name} has no GGUF name for {arch}")
            if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
                data = permute_qk(data, n_head, n_head)
            elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
                data = permute_qk(data, n_head, n_kv)
            array, kwargs = encode(data, qtype)
            writer.add_tensor(name, array, **kwargs)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return GgufResult(out, arch, qtype, count, out.stat().st_size)


def encode(data: np.ndarray, qtype: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(array, add_tensor kwargs) for one tensor: 1-D stays f32; 2-D becomes f16 or q8_0."""
    import gguf

    if data.ndim == 1:
        return data.astype(np.float32), {}
    if qtype == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q), {"raw_dtype": q}
    return data.astype(np.float16), {}
