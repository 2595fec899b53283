"""Convert a Hugging Face model folder into one GGUF file for llama.cpp, Ollama, LM Studio.

Written with the ``gguf`` package the way llama.cpp expects it: architecture metadata under
``ARCH.*`` keys and tensors renamed by gguf's own name map (:mod:`danlu.export.gguf_arch`), the
tokenizer with its chat template and stop tokens (:mod:`danlu.export.gguf_vocab`). Tensors are
streamed: a first pass over the safetensors headers writes every tensor's name, shape and type,
a second writes the data one tensor at a time, so an export holds about one tensor in memory
whatever the model's size.

``f32``, ``f16``, ``bf16`` and ``q8_0`` are written here (gguf's own numpy encoders); the
k-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``) are made from a 16-bit file by llama.cpp's own
quantizer through llama-cpp-python (the ``danlu[llama-cpp]`` extra), so they are what llama.cpp's
``llama-quantize`` makes. Everything is written into a temp file next to ``out`` that replaces it
only at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from danlu.errors import UserError
from danlu.export.gguf_arch import (
    FAMILIES,
    Family,
    add_metadata,
    check,
    extra_tensors,
    transform,
    with_aliases,
)
from danlu.export.gguf_vocab import add_tokenizer

log = logging.getLogger(__name__)

GGUF_ARCHITECTURES = {arch: (f.gguf, f.permute_qk) for arch, f in FAMILIES.items()}
# written by danlu itself, then those made by llama.cpp's quantizer from a 16-bit file
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
GGUF_TYPES = DIRECT_TYPES + LLAMA_CPP_TYPES
PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)


@dataclass
class GgufResult:
    """The written file and what went into it."""

    path: Path
    arch: str
    qtype: str
    tensors: int
    bytes: int
    stop_tokens: list[str] = field(default_factory=list)
    chat_template: str | None = None
    fallback: int = 0  # tensors llama.cpp's quantizer kept in another type (rows not a multiple of 256)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"--model {model_dir}: no config.json there; point it at a Hugging Face model folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if "text_config" in config and "hidden_size" not in config:
        config = {**config, **config["text_config"]}
    config = with_aliases(config)
    check(config, model_dir)
    return config


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    if not all((model_dir / f).is_file() for f in files):
        raise UserError(f"--model {model_dir}: no safetensors weights there (model.safetensors or an index)")
    return [model_dir / f for f in files]


@dataclass
class Planned:
    """One tensor of the output: where its data comes from and how it is stored."""

    name: str  # GGUF name
    source: tuple[Path, str] | None  # safetensors file and tensor name; None for generated data
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    data: np.ndarray | None = None  # generated tensors (rope_freqs) only


def storage_type(shape: tuple[int, ...], qtype: str):
    """How one tensor is stored: 1-D tensors stay f32 (as llama.cpp does), 2-D ones take ``qtype``."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or qtype == "f32":
        return Q.F32
    if qtype == "bf16":
        return Q.BF16
    if qtype == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def plan(model_dir: Path, config: dict[str, Any], family: Family, qtype: str) -> list[Planned]:
    """Every output tensor from the safetensors headers alone (no tensor data is read)."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.gguf.upper()], config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", family.tied or family.gguf.startswith("gemma")))
    out: list[Planned] = []
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for hf_name in st.keys():
                if tied and hf_name == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(
                    hf_name.removeprefix(family.hf_prefix), try_suffixes=(".weight", ".bias")
                )
                if name is None:
                    raise UserError(
                        f"--model {model_dir}: tensor {hf_name} has no GGUF name for {family.gguf}"
                    )
                shape = tuple(st.get_slice(hf_name).get_shape())
                out.append(Planned(name, (f, hf_name), shape, storage_type(shape, qtype)))
    for name, data in extra_tensors(config).items():
        out.append(Planned(name, None, data.shape, storage_type(data.shape, qtype), data))
    return out


def encode(data: np.ndarray, qtype: Any) -> np.ndarray:
    """One tensor's bytes in its storage type (gguf's numpy encoders for bf16 and q8_0)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def tensor_data(planned: list[Planned], family: Family, config: dict[str, Any]) -> Iterator[np.ndarray]:
    """The encoded data of each planned tensor in order, loading one source tensor at a time."""
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    try:
        for p in planned:
            if p.source is None:
                data = p.data
            else:
                path, hf_name = p.source
                if path not in handles:
                    for old in list(handles):  # files come in order: close the previous shard
                        handles.pop(old).__exit__(None, None, None)
                    handles[path] = safe_open(str(path), framework="pt").__enter__()
                data = handles[path].get_tensor(hf_name).float().numpy()
                data = transform(data, p.name, family, config)
            yield encode(data, p.qtype)
            del data
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def write_gguf(model_dir: Path, path: Path, config: dict[str, Any], qtype: str) -> tuple[int, dict[str, Any]]:
    """Write ``model_dir`` as a GGUF file at ``path`` (f32, f16, bf16 or q8_0); returns (tensors, vocab info)."""
    import gguf

    family = check(config, model_dir)
    planned = plan(model_dir, config, family, qtype)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype]
    writer = gguf.GGUFWriter(str(path), family.gguf)
    vocab = add_tokenizer(writer, model_dir, config["vocab_size"])
    add_metadata(writer, config, family, model_name(model_dir, vocab["tokenizer"]), int(file_type))
    for p in planned:
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype)))
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensor_data(planned, family, config):
        writer.write_tensor_data(data)
    writer.close()
    return len(planned), vocab


def model_name(model_dir: Path, tokenizer: Any) -> str:
    """general.name: the folder's name, with one catch. llama.cpp strips the whitespace after
    special tokens of models whose name says Phi-3 (as Phi-3's tokenizer does with rstrip), and
    fails to load them without Phi-3's own special tokens: the name says Phi-3 exactly when the
    tokenizer does that."""
    name = PHI3_NAME.sub("phi", model_dir.resolve().name)
    specials = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
    vocab = tokenizer.get_vocab()
    if any(t.rstrip for t in specials) and all(t in vocab for t in ("<s>", "</s>", "<unk>", "<|endoftext|>")):
        name += " phi3"
    return name


def export_gguf(
    model_dir: str | Path, out: str | Path, *, qtype: str = "f16", overwrite: bool = False
) -> GgufResult:
    """Write ``model_dir`` (a safetensors model folder) as one GGUF file at ``out``.

    ``qtype``: f32, f16, bf16 or q8_0 (llama.cpp's 8-bit blocks of 32) written here, 1-D tensors
    (norms, biases) staying f32 as llama.cpp does; q4_k_m, q5_k_m, q6_k by llama.cpp's quantizer.
    """
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser().resolve()
    if qtype not in GGUF_TYPES:
        raise UserError(f"--type {qtype}: choose one of {', '.join(GGUF_TYPES)}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it or choose another file")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: the file name should end in .gguf")
    config = read_config(model_dir)
    if qtype in LLAMA_CPP_TYPES:
        from danlu.export.gguf_quant import require_llama_cpp

        require_llama_cpp(f"--type {qtype}")
    arch = FAMILIES[config["architectures"][0]].gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmps: list[Path] = []

    def temp() -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
        os.close(fd)
        tmps.append(Path(name))
        return tmps[-1]

    fallback = 0
    try:
        if qtype in LLAMA_CPP_TYPES:
            from danlu.export.gguf_quant import quantize

            source = temp()
            count, vocab = write_gguf(model_dir, source, config, sixteen_bit(model_dir))
            final = temp()
            fallback = quantize(source, final, qtype)
        else:
            final = temp()
            count, vocab = write_gguf(model_dir, final, config, qtype)
        os.replace(final, out)
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)
    tokenizer = vocab["tokenizer"]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [tokenizer.convert_ids_to_tokens(i) for i in vocab["stop_ids"]]
    return GgufResult(out, arch, qtype, count, out.stat().st_size, stops, tokenizer.chat_template, fallback)


def sixteen_bit(model_dir: Path) -> str:
    """The 16-bit type a k-quant is made from: bf16 for bf16 weights (no overflow), else f16."""
    from safetensors import safe_open

    with safe_open(str(safetensors_files(model_dir)[0]), framework="pt") as st:
        dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}
    return "bf16" if "BF16" in dtypes else "f16"
