"""A LoRA adapter as a GGUF file for ``llama-cli -m base.gguf --lora adapter.gguf``.

Tens of megabytes instead of the whole model: llama.cpp applies ``scale * B(A x)`` next to each
base weight, with ``scale = adapter.lora.alpha / rank`` (times the user's ``--lora-scaled``).
Each PEFT pair ``...q_proj.lora_A/B.weight`` becomes ``blk.N.attn_q.weight.lora_a/b`` under the
base's GGUF names; where the base's q/k rows are permuted for llama.cpp's rotary layout, so are
``lora_B``'s rows (the output side). rsLoRA's ``alpha / sqrt(rank)`` is written as
``alpha * sqrt(rank)`` so that llama.cpp's ``alpha / rank`` gives the same scale. DoRA (a
magnitude vector llama.cpp has no place for) and adapters that train whole modules
(``modules_to_save``) are refused: merge those and export the merged model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from danlu.errors import UserError
from danlu.export.gguf_arch import FAMILIES, permute_qk, qkv_blocks, qkv_groups


@dataclass
class LoraGgufResult:
    path: Path
    arch: str
    pairs: int
    alpha: float
    rank: int
    bytes: int


def export_lora_gguf(
    adapter_dir: str | Path, base_dir: str | Path, out: str | Path, *, overwrite: bool = False
) -> LoraGgufResult:
    """Write the PEFT LoRA adapter in ``adapter_dir`` (trained on ``base_dir``) as a GGUF adapter."""
    import gguf
    from safetensors import safe_open

    from danlu.export.gguf import read_config

    adapter_dir, base_dir = Path(adapter_dir).expanduser(), Path(base_dir).expanduser()
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it or choose another file")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: the file name should end in .gguf")
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(
            f"--adapter {adapter_dir}: no adapter_config.json and adapter_model.safetensors there"
        )
    acfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if acfg.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"--adapter {adapter_dir}: a {acfg.get('peft_type')} adapter; llama.cpp reads LoRA only"
        )
    if acfg.get("use_dora"):
        raise UserError(
            f"--adapter {adapter_dir}: DoRA has no GGUF adapter form; merge it (danlu merge) and export the model"
        )
    if acfg.get("modules_to_save"):
        raise UserError(
            f"--adapter {adapter_dir}: it trains whole modules ({', '.join(acfg['modules_to_save'])}); "
            "merge it (danlu merge) and export the model"
        )
    config = read_config(base_dir)
    family = FAMILIES[config["architectures"][0]]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.gguf.upper()], config["num_hidden_layers"])
    rank = int(acfg["r"])
    alpha = float(acfg.get("lora_alpha", rank))
    if acfg.get("use_rslora"):
        alpha *= math.sqrt(rank)
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise UserError(f"--adapter {adapter_dir}: per-module ranks or alphas; merge it and export the model")

    with safe_open(str(weights), framework="pt") as st:
        keys = sorted(st.keys())
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for key in keys:
            if ".lora_A." not in key and ".lora_B." not in key:
                raise UserError(
                    f"--adapter {adapter_dir}: tensor {key} is not a LoRA pair; merge it and export"
                )
            side = "a" if ".lora_A." in key else "b"
            hf = key.removeprefix("base_model.model.").replace(f".lora_{side.upper()}.weight", ".weight")
            hf = hf.removeprefix(family.hf_prefix)
            name = names.get_name(hf, try_suffixes=(".weight",))
            if name is None or name.startswith(("token_embd", "output.")):
                raise UserError(
                    f"--adapter {adapter_dir}: LoRA on {hf} has no GGUF adapter form here; merge it"
                )
            data = st.get_tensor(key).float().numpy()
            if side == "b" and family.permute_qk and name.endswith("attn_q.weight"):
                data = permute_qk(data, n_head)
            elif side == "b" and family.permute_qk and name.endswith("attn_k.weight"):
                data = permute_qk(data, n_kv)
            elif side == "b" and family.fused_qkv and name.endswith("attn_qkv.weight"):
                data = qkv_blocks(data, n_head, qkv_groups(config))  # B's rows are the fused qkv rows
            pairs.setdefault(name, {})[side] = data

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), family.gguf)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.resolve().name)
        for name, ab in pairs.items():
            if set(ab) != {"a", "b"}:
                raise UserError(f"--adapter {adapter_dir}: {name} has lora_A or lora_B but not both")
            writer.add_tensor(f"{name}.lora_a", ab["a"].astype(np.float32))
            writer.add_tensor(f"{name}.lora_b", ab["b"].astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return LoraGgufResult(out, family.gguf, len(pairs), alpha, rank, out.stat().st_size)
