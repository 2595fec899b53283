"""What each supported architecture writes into a GGUF file besides its tensors' bytes.

One ``Family`` per Hugging Face architecture: llama.cpp's architecture name, and how tensors
change on the way (Llama's q/k rows permuted into llama.cpp's rotary layout, Gemma's norm weights
stored as ``1 + w``, Llama-3.1's rope frequencies as a ``rope_freqs`` tensor, BLOOM's and
Falcon's fused query/key/value rows regrouped from per head (group) to per kind). The metadata keys
are the ones llama.cpp's loader reads for that architecture; config.json is read as transformers 5
writes it (``rope_parameters``) and as older folders have it (``rope_scaling``, ``rope_theta``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from danlu.errors import UserError

CONVERTER = "use llama.cpp's convert_hf_to_gguf.py"
# for shapes llama.cpp's graph for the family does not compute (its converter would write them wrong)
NO_GRAPH = "llama.cpp cannot run it; serve the folder itself (danlu serve --model DIR)"


@dataclass(frozen=True)
class Family:
    gguf: str  # llama.cpp's architecture name
    permute_qk: bool = False  # rotary over interleaved pairs in llama.cpp, halves in transformers
    norm_shift: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
    rope_types: tuple[str, ...] = ("default",)
    fused_qkv: bool = False  # qkv rows per kv group [group][q..|k|v] (BLOOM, Falcon); llama.cpp: [q|k|v]
    hf_prefix: str = ""  # stripped before gguf's name map (it knows BLOOM's names without "transformer.")
    tied: bool = False  # tie_word_embeddings when config.json leaves it out


FAMILIES = {
    "LlamaForCausalLM": Family("llama", permute_qk=True, rope_types=("default", "llama3", "linear")),
    "MistralForCausalLM": Family("llama", permute_qk=True),  # llama.cpp writes Mistral as llama too
    "Qwen2ForCausalLM": Family("qwen2", rope_types=("default", "linear")),
    "Qwen3ForCausalLM": Family("qwen3", rope_types=("default", "linear")),
    "Phi3ForCausalLM": Family("phi3"),
    "Gemma2ForCausalLM": Family("gemma2", norm_shift=1.0),
    "Gemma3ForCausalLM": Family("gemma3", norm_shift=1.0, rope_types=("default", "linear")),
    # ALiBi positions and LayerNorm with biases: llama.cpp's bloom graph (no rope keys written)
    "BloomForCausalLM": Family("bloom", fused_qkv=True, hf_prefix="transformer.", tied=True),
    # rotary (neox), attention and MLP in parallel from the same LayerNorm (two in the 40B shape)
    "FalconForCausalLM": Family("falcon", fused_qkv=True, tied=True),
}

# older config.json names (BLOOM's), read as today's
CONFIG_ALIASES = {"n_embed": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers"}
# BLOOM was trained on 2048-token sequences; its config.json has no context length
BLOOM_CONTEXT = 2048

# Architectures people ask for that danlu does not write, and what to do instead.
INSTEAD = {
    "Gemma3ForConditionalGeneration": "export the text model (Gemma3ForCausalLM) or use llama.cpp's "
    "convert_hf_to_gguf.py, which also writes the vision projector",
    "MixtralForCausalLM": CONVERTER + " (mixture-of-experts)",
    "Qwen2MoeForCausalLM": CONVERTER + " (mixture-of-experts)",
    "Qwen3MoeForCausalLM": CONVERTER + " (mixture-of-experts)",
}


def with_aliases(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with BLOOM's n_head / n_layer / n_embed also under today's names."""
    out = dict(config)
    for old, new in CONFIG_ALIASES.items():
        if old in config and new not in config:
            out[new] = config[old]
    return out


def rope_params(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The rope parameters of one layer type, from rope_parameters (transformers 5) or rope_scaling."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if layer_type in rope or "full_attention" in rope:
        rope = dict(rope.get(layer_type) or {})
    rope.setdefault("rope_type", rope.get("type") or "default")
    if layer_type == "sliding_attention" and config.get("rope_local_base_freq"):
        rope.setdefault("rope_theta", config["rope_local_base_freq"])
    rope.setdefault("rope_theta", config.get("rope_theta") or 10000.0)
    return rope


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def check(config: dict[str, Any], model_dir: Path) -> Family:
    """The family of config.json's architecture, or a one-line refusal naming what to use instead."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in FAMILIES:
        hint = INSTEAD.get(arch, CONVERTER)
        raise UserError(
            f"--model {model_dir}: cannot export {arch} to GGUF; supported: {', '.join(FAMILIES)}; {hint}"
        )
    family = FAMILIES[arch]
    for layer_type in ("full_attention", "sliding_attention"):
        rope_type = rope_params(config, layer_type)["rope_type"]
        if rope_type not in family.rope_types:
            raise UserError(
                f"--model {model_dir}: rope scaling '{rope_type}' of {arch} is not written by danlu's GGUF "
                f"export (it writes {', '.join(family.rope_types)}); {CONVERTER}"
            )
    if family.gguf in ("gemma2", "gemma3"):
        scalar = config.get("query_pre_attn_scalar")
        if scalar is not None and scalar != head_dim(config):
            # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B shapes it recognizes
            raise UserError(
                f"--model {model_dir}: query_pre_attn_scalar {scalar} differs from head_dim {head_dim(config)}; "
                f"{CONVERTER}"
            )
    if family.gguf == "phi3" and config.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"--model {model_dir}: Phi-3 with partial rotary embeddings; {CONVERTER}")
    if family.gguf == "bloom" and config.get("apply_residual_connection_post_layernorm"):
        # llama.cpp's bloom graph adds the block's input, not its normalized input, to the residual
        raise UserError(
            f"--model {model_dir}: BLOOM with apply_residual_connection_post_layernorm=true is not what "
            f"llama.cpp's bloom graph computes; {NO_GRAPH}"
        )
    if family.gguf == "falcon":
        check_falcon(config, model_dir)
    return family


def check_falcon(config: dict[str, Any], model_dir: Path) -> None:
    """llama.cpp's falcon graph: rotary positions, attention and MLP in parallel, no biases."""
    for key, bad, what in (
        ("alibi", True, "ALiBi positions (llama.cpp's falcon is rotary)"),
        ("parallel_attn", False, "attention and MLP in sequence (llama.cpp's falcon runs them in parallel)"),
        ("bias", True, "linear biases (llama.cpp's falcon has none)"),
    ):
        if bool(config.get(key, not bad)) == bad:
            raise UserError(f"--model {model_dir}: Falcon with {key}={str(bad).lower()}: {what}; {NO_GRAPH}")


def qkv_groups(config: dict[str, Any]) -> int:
    """The kv groups of a fused qkv (each: its query heads, one key head, one value head): Falcon's
    new decoder has num_kv_heads, its multi-query shape one, BLOOM and the rest one per head."""
    n_head = config["num_attention_heads"]
    if config.get("new_decoder_architecture"):
        return config.get("num_kv_heads") or n_head
    return 1 if config.get("multi_query") else n_head


def add_metadata(writer: Any, config: dict[str, Any], family: Family, name: str, file_type: int) -> None:
    """Architecture metadata: the keys llama.cpp's loader reads for the family."""
    if family.gguf in ("bloom", "falcon"):
        return add_fused_metadata(writer, config, family, name, file_type)
    n_head = config["num_attention_heads"]
    rope = rope_params(config)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // n_head or config.get("head_dim"):
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    if rope["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if family.gguf == "phi3":
        writer.add_rope_scaling_orig_ctx_len(
            config.get("original_max_position_embeddings") or config["max_position_embeddings"]
        )
        writer.add_sliding_window(0)  # llama.cpp runs Phi-3 with full attention
    if family.gguf in ("gemma2", "gemma3"):
        if config.get("attn_logit_softcapping"):
            writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        layer_types = config.get("layer_types")
        if config.get("sliding_window") and layer_types:
            writer.add_sliding_window(int(config["sliding_window"]))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            writer.add_rope_freq_base_swa(float(rope_params(config, "sliding_attention")["rope_theta"]))
        elif family.gguf == "gemma2":
            writer.add_sliding_window(int(config.get("sliding_window") or 4096))


def add_fused_metadata(
    writer: Any, config: dict[str, Any], family: Family, name: str, file_type: int
) -> None:
    """BLOOM's and Falcon's keys: LayerNorm (not RMS), key/value heads as the fused qkv groups them;
    BLOOM without rope (llama.cpp applies ALiBi with BLOOM's slopes), Falcon's rope base."""
    hidden = config["hidden_size"]
    writer.add_name(name)
    if family.gguf == "bloom":
        writer.add_context_length(int(config.get("seq_length") or BLOOM_CONTEXT))
    else:
        writer.add_context_length(int(config.get("max_position_embeddings") or BLOOM_CONTEXT))
        writer.add_rope_freq_base(float(rope_params(config)["rope_theta"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(int(config.get("ffn_hidden_size") or 4 * hidden))  # BLOOM: always 4x
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(qkv_groups(config))
    writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon") or 1e-5))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """Llama-3.1's per-frequency rope divisors (the published 'llama3' rope scaling), for rope_freqs.

    Frequencies with a wavelength below original_context/high_freq_factor keep theirs (1), those
    above original_context/low_freq_factor are divided by factor, and those between are blended.
    """
    rope = rope_params(config)
    dim = head_dim(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def extra_tensors(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Tensors llama.cpp wants that the checkpoint lacks (GGUF name → data)."""
    if rope_params(config)["rope_type"] == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(config)}
    return {}


def transform(data: np.ndarray, gguf_name: str, family: Family, config: dict[str, Any]) -> np.ndarray:
    """One tensor as llama.cpp wants it: q/k rows permuted, Gemma norms shifted, fused qkv regrouped."""
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    if family.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        data = permute_qk(data, n_head)
    elif family.permute_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        data = permute_qk(data, n_kv)
    if family.norm_shift and gguf_name.endswith("norm.weight"):
        data = data + np.float32(family.norm_shift)
    if family.fused_qkv and gguf_name.endswith(("attn_qkv.weight", "attn_qkv.bias")):
        data = qkv_blocks(data, n_head, qkv_groups(config))
    return data


def qkv_blocks(w: np.ndarray, n_head: int, n_groups: int) -> np.ndarray:
    """Fused qkv rows from per kv group ([group][its query heads, a key, a value][head_dim]: BLOOM
    with a group per head, Falcon) to per kind ([all q][all k][all v], what llama.cpp splits);
    weight or bias."""
    rest = w.shape[1:]
    g = w.reshape(n_groups, n_head // n_groups + 2, w.shape[0] // (n_head + 2 * n_groups), *rest)
    q, k, v = g[:, :-2], g[:, -2], g[:, -1]
    return np.concatenate([x.reshape(-1, *rest) for x in (q, k, v)])


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head reordered from rotary halves (transformers) to interleaved pairs (llama.cpp)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
