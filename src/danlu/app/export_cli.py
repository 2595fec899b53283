"""``danlu merge`` and ``danlu export gguf``: thin verbs over :mod:`danlu.export`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from danlu.app.common import add_trust_flag, model_for, trust_remote_code


def cmd_merge(args: argparse.Namespace) -> int:
    from danlu.errors import UserError
    from danlu.export import merge
    from danlu.model import DTYPES

    if not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter}: no such folder; point it at OUTPUT/final of a run")
    base = model_for(args, args.adapter)
    result = merge(
        args.adapter,
        base,
        args.out,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        max_shard_size=args.max_shard_size,
        device=args.device,
        overwrite=args.overwrite,
        trust_remote_code=trust_remote_code(args, base, args.adapter),
        base_precision=args.base_precision,
    )
    trust = " --trust-remote-code" if result.custom_code else ""
    shards = [f for f in result.files if f.endswith(".safetensors")]
    print(f"merged model: {result.out} ({len(shards)} safetensors file(s))")
    print(f"chat with it: danlu chat --model {result.out}{trust}")
    print(f"convert for llama.cpp: danlu export gguf --model {result.out} --out {result.out.name}.gguf")
    return 0


# the --type choices of danlu.export.gguf.GGUF_TYPES, here so --help needs no import of it
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


def _wrote_gguf(result: Any) -> None:
    size = result.bytes / 2**20
    print(f"wrote {result.path} ({result.arch}, {result.qtype}, {result.tensors} tensors, {size:.1f} MiB)")
    if result.fallback:
        print(f"  llama.cpp kept {result.fallback} tensor(s) in another type: rows not a multiple of 256")


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from danlu.export import export_gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file chatter
    result = export_gguf(args.model, args.out, qtype=args.type, overwrite=args.overwrite)
    _wrote_gguf(result)
    print(f"run it: llama-cli -m {result.path} -cnv")
    return 0


def cmd_export_ollama(args: argparse.Namespace) -> int:
    from danlu.export.ollama import export_ollama

    logging.getLogger("gguf").setLevel(logging.WARNING)
    result = export_ollama(args.model, args.out, qtype=args.type, overwrite=args.overwrite)
    _wrote_gguf(result.gguf)
    print(
        f"wrote {result.modelfile} (TEMPLATE from the chat template, stop: {', '.join(result.gguf.stop_tokens)})"
    )
    name = result.gguf.path.stem.lower().replace("_", "-")
    print(f"run it: ollama create {name} -f {result.modelfile} && ollama run {name}")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from danlu.export.gguf_lora import export_lora_gguf
    from danlu.model import resolve

    logging.getLogger("gguf").setLevel(logging.WARNING)
    base = resolve(model_for(args, args.adapter))
    result = export_lora_gguf(args.adapter, base, args.out, overwrite=args.overwrite)
    size = result.bytes / 2**20
    print(
        f"wrote {result.path} ({result.arch} LoRA, {result.pairs} pairs, rank {result.rank}, {size:.1f} MiB)"
    )
    print(
        f"run it: llama-cli -m BASE.gguf --lora {result.path} -cnv   (BASE.gguf: danlu export gguf --model {base})"
    )
    return 0


def _adapter_flags(p: argparse.ArgumentParser) -> None:
    """``--adapter`` and ``--model`` of the verbs that start from an adapter (merge, export lora)."""
    p.add_argument("--adapter", required=True, help="LoRA adapter folder, e.g. out/identity/final")
    p.add_argument("--model", default=None, help="base model (default: the base the adapter was trained on)")


def _gguf_flags(p: argparse.ArgumentParser, example: str, qtype: str) -> None:
    """The flags of the verbs that write a model as GGUF (export gguf, export ollama)."""
    p.add_argument("--model", required=True, help="model folder with config.json and safetensors")
    p.add_argument("--out", required=True, help=f"output GGUF file, e.g. {example}")
    p.add_argument("--type", default=qtype, choices=GGUF_TYPES, help=f"weight type (default {qtype})")
    p.add_argument("--overwrite", action="store_true", help="replace existing files at --out")


def add_export_parser(sub: Any) -> None:
    """Register ``merge`` and ``export`` on the top-level subparsers."""
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and write a plain model folder",
        description="Merge a LoRA adapter into its base (loaded unquantized), check that the merged "
        "model's logits match base + adapter, and write sharded safetensors, the tokenizer with its "
        "chat template, generation_config.json and a model card.",
    )
    _adapter_flags(p)
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument(
        "--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="weight dtype (default: the base's)"
    )
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to merge")
    p.add_argument(
        "--base-precision",
        default="original",
        choices=["original", "dequantized"],
        help="QLoRA adapters: merge into the base's original weights (default) or into the 4-bit weights "
        "it trained on, dequantized (what was trained); the merge prints how far each is from both",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a model folder already at --out")
    add_trust_flag(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="convert a model folder for other runtimes (GGUF for llama.cpp)")
    esub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    g = esub.add_parser(
        "gguf",
        help="write one GGUF file for llama.cpp, Ollama, LM Studio",
        description="Convert a Hugging Face model folder (e.g. the output of danlu merge) into one GGUF "
        "file with its tokenizer, chat template and stop tokens: Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/2.5, "
        "Qwen3, Phi-3, Gemma-2, Gemma-3 (text). f32/f16/bf16/q8_0 are written by danlu; q6_k, q5_k_m, "
        "q4_k_m by llama.cpp's own quantizer (pip install 'danlu[llama-cpp]').",
    )
    _gguf_flags(g, "model.gguf", "f16")
    g.set_defaults(func=cmd_export_gguf)

    o = esub.add_parser(
        "ollama",
        help="write a GGUF file and an Ollama Modelfile next to it",
        description="Like 'export gguf', plus OUT_STEM.Modelfile: FROM the GGUF, TEMPLATE rendering the "
        "chat template the run trained with (checked to render the same text), PARAMETER stop for every "
        "stop token, and the sampling defaults of generation_config.json. Then: ollama create NAME -f it.",
    )
    _gguf_flags(o, "ship/model.gguf", "q8_0")
    o.set_defaults(func=cmd_export_ollama)

    lo = esub.add_parser(
        "lora",
        help="write a LoRA adapter as a GGUF adapter for llama.cpp's --lora",
        description="Convert a LoRA adapter folder (OUTPUT/final of a run) into a GGUF adapter that llama.cpp "
        "applies to the base model's GGUF (llama-cli -m base.gguf --lora adapter.gguf).",
    )
    _adapter_flags(lo)
    lo.add_argument("--out", required=True, help="output file, e.g. adapter.gguf")
    lo.add_argument("--overwrite", action="store_true", help="replace existing files at --out")
    lo.set_defaults(func=cmd_export_lora)
