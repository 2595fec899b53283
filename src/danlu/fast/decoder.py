"""A Llama-family decoder run over a padding-free row, through the model's own modules.

Nothing is replaced or patched: the function below calls the same embedding, projections
(plain, LoRA-wrapped or 4-bit), norms' weights and rotary module that transformers' forward
would, in the same order with the same arithmetic, but on a single row of only real tokens
with :func:`danlu.fast.varlen.attention`, :mod:`danlu.fast.kernels` for the memory-bound
steps and :func:`danlu.fast.lora.project` for the (LoRA-wrapped) projections. Gradient
checkpointing follows the flag transformers sets on each layer; compiled, a checkpointed layer is
two graphs (attention half, MLP half), so that the backward recomputes only what it reads.
Adapters saved from this path are the same files as from the plain path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from danlu.fast import Options, kernels, lora
from danlu.fast.offload import Offloader
from danlu.fast.varlen import Flat, attention

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")
"""model_type values whose decoder layers are exactly: RMSNorm, attention with rotary embedding
(Qwen3's RMSNorm over each query and key head before the rotary embedding; Phi-3's query, key and
value from one fused projection; a sliding window where the config sets one), residual, RMSNorm,
SwiGLU MLP (Phi-3's gate and up from one fused projection), residual. Gemma-3 (text) differs in
ways written out here: embeddings scaled (by its own embedding module), every RMSNorm scaling by
``1 + weight`` in fp32, per-head query/key norms, the attention's and the MLP's outputs normed
again before each residual add, a GeGLU MLP (tanh GELU), and local (sliding-window) and global
layers each with their own rotary tables. Each is checked equal to transformers' forward
(tests/test_fast_decoder.py), and every run checks its loss against the model's own on its first
samples before training (danlu.train.fast_loss_agrees)."""

GEMMA = ("gemma3_text",)
"""The architectures of :data:`ARCHITECTURES` with Gemma's norms and GeGLU MLP."""

_ACTIVATION = {"gemma3_text": ("hidden_activation", "gelu_pytorch_tanh")}
"""Where a config names its MLP's activation and the one this decoder computes (else hidden_act, silu)."""


def supports(lm: Any) -> bool:
    """Whether ``lm`` (a causal LM, unwrapped) has the decoder this module knows how to run."""
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    key, activation = _ACTIVATION.get(model_type, ("hidden_act", "silu"))
    if model_type not in ARCHITECTURES or getattr(config, key, None) != activation or _dropout(config):
        return False
    if model_type in GEMMA and not _gemma_known(config):
        return False
    if any(_partial_rotary(config, rope) for rope in _ropes(config, model_type in GEMMA)):
        return False  # rotary over part of each head (Phi-4-mini): not written here
    decoder = lm.get_decoder()
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(decoder, n) for n in needed):
        return False
    gemma = model_type in GEMMA
    if gemma != _per_layer_type(decoder.rotary_emb):
        return False
    return all(_layer_known(layer, gemma) for layer in decoder.layers)


def _gemma_known(config: Any) -> bool:
    """Whether a Gemma-3 config asks for nothing more than :func:`hidden_states` computes: no soft
    cap on attention or output logits, causal attention (not bidirectional), local and global layers."""
    return (
        getattr(config, "attn_logit_softcapping", None) is None
        and getattr(config, "final_logit_softcapping", None) is None
        and not getattr(config, "use_bidirectional_attention", False)
        and set(getattr(config, "layer_types", None) or ()) <= {"sliding_attention", "full_attention"}
    )


def _ropes(config: Any, per_layer_type: bool) -> list[dict[str, Any]]:
    """The config's rotary parameters: one set, or (Gemma-3) one per layer type."""
    rope = getattr(config, "rope_parameters", None) or {}
    return [r or {} for r in rope.values()] if per_layer_type else [rope]


def _partial_rotary(config: Any, rope: dict[str, Any]) -> bool:
    return rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0


def _per_layer_type(rotary: Any) -> bool:
    """Whether the rotary module computes its tables per layer type (Gemma-3: local and global)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters


def _dropout(config: Any) -> bool:
    """Whether training would drop anything inside the decoder (attention weights, Phi-3's residual
    branches or embeddings): this decoder applies no dropout, so those models take transformers' path."""
    names = ("attention_dropout", "resid_pdrop", "embd_pdrop", "hidden_dropout")
    return any(float(getattr(config, n, 0.0) or 0.0) > 0.0 for n in names)


def _layer_known(layer: Any, gemma: bool = False) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    split = all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
    if not (split or hasattr(attn, "qkv_proj")) or not all(
        hasattr(attn, n) for n in ("o_proj", "head_dim", "scaling")
    ):
        return False
    if not (all(hasattr(mlp, n) for n in ("gate_proj", "up_proj")) or hasattr(mlp, "gate_up_proj")):
        return False
    if not hasattr(mlp, "down_proj") or hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
        return False
    window = sliding_window(attn)
    if window is not None and (not isinstance(window, int) or window < 1):
        return False
    if gemma and (not hasattr(attn, "q_norm") or getattr(attn, "layer_type", None) is None):
        return False
    names = _NORMS if gemma else _NORMS[:2]
    norms = [getattr(layer, n, None) for n in names] + [
        getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)
    ]
    eps = "eps" if gemma else "variance_epsilon"
    return all(hasattr(m, "weight") and hasattr(m, eps) for m in norms)


_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
"""A layer's norms: Llama's two, Gemma-3's four (where the second norms the attention's output)."""


def sliding_window(attn: Any) -> int | None:
    """How many tokens each query of this attention layer sees (itself included), or None for all
    before it: the layer's own setting (Qwen2/Qwen3 set it per layer), else its config's (Mistral, Phi-3)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


def hidden_states(lm: Any, flat: Flat, options: Options) -> torch.Tensor:
    """The final (normed) hidden states [T, hidden] of ``flat``'s tokens."""
    decoder = lm.get_decoder()
    gemma = lm.config.model_type in GEMMA
    x = decoder.embed_tokens(flat.input_ids)  # Gemma's module scales them
    tables = _rotary_tables(decoder, x, flat.position_ids)
    whole = compiles_layers(options, x.device)
    ops = _Ops(x.device, options.fused and not whole, options.lora, options.dense, gemma)
    offload = _offloader(options, x.device, *(t for pair in tables.values() for t in pair))
    # a 4-bit base's compiled checkpoint must be told to dequantize again rather than keep the result
    saved = _checkpointed_4bit if whole and getattr(lm, "hf_quantizer", None) is not None else _checkpointed
    if whole:
        plain, kept = _compiled(_layer), _compiled(saved)
    else:  # eager: only the reentrant checkpoint saves its input where the offloader's hooks see it
        plain, kept = _layer, _reentrant if offload is not None else saved
    # compiled, a layer is checkpointed as two halves: the MLP half's input (the residual after
    # o_proj) is kept (in CPU memory with the offloader), so the backward does not run o_proj's
    # forward again (eager, a checkpoint reruns all of its half: there it would only keep more)
    parts = (_attention_half, _mlp_half) if whole and options.split else (_layer,)
    keeps = keeps_attention(lm, options, x.device)
    for layer in decoder.layers:
        cos, sin = tables[getattr(layer.self_attn, "layer_type", None) if gemma else None]
        keep_less = (
            getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()
        )
        if not keep_less:
            x = plain(layer, x, cos, sin, flat, ops)
            continue
        for part in parts:
            if keeps and part is _attention_half:
                with offload.saving():  # everything it keeps waits in CPU memory
                    x = _compiled(_checkpointed_attention)(part, layer, x, cos, sin, flat, ops)
                continue
            if offload is None:
                x = kept(part, layer, x, cos, sin, flat, ops)
                continue
            if not whole and not x.requires_grad:
                # the reentrant checkpoint runs no backward without an input that requires grad;
                # below the first layer nothing trains (frozen embeddings): cut off and marked
                x = x.detach().requires_grad_()
            with offload.saving(x):
                x = kept(part, layer, x, cos, sin, flat, ops)
    rms_norm = kernels.pick(kernels.gemma_rms_norm if gemma else kernels.rms_norm, options.fused, x.device)
    return rms_norm(x, decoder.norm.weight, decoder.norm.eps if gemma else decoder.norm.variance_epsilon)


def _rotary_tables(
    decoder: Any, x: torch.Tensor, positions: torch.Tensor
) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
    """cos and sin [T, head_dim] of ``positions``: under None, or (Gemma-3) per layer type, each
    from that type's rotary parameters (local and global layers rotate at different bases)."""
    rotary = decoder.rotary_emb
    if not _per_layer_type(rotary):
        cos, sin = rotary(x, positions.unsqueeze(0))
        return {None: (cos[0], sin[0])}
    tables = {}
    for kind in dict.fromkeys(layer.self_attn.layer_type for layer in decoder.layers):
        cos, sin = rotary(x, positions.unsqueeze(0), kind)
        tables[kind] = cos[0], sin[0]
    return tables


def compiles_layers(options: Options, device: torch.device) -> bool:
    """Whether each layer runs as one compiled graph: asked for and possible here."""
    return options.compile and kernels.can_compile(device)


class _Ops:
    def __init__(
        self, device: torch.device, fused: bool, fused_lora: bool, dense: bool, gemma: bool = False
    ) -> None:
        norm = kernels.gemma_rms_norm if gemma else kernels.rms_norm
        self.rms_norm = kernels.pick(norm, fused, device)
        self.rope = kernels.pick(kernels.rope, fused, device)
        self.act = kernels.pick(kernels.geglu if gemma else kernels.swiglu, fused, device)
        self.project = lora.project if fused_lora else _plain_project
        self.dense = dense
        self.gemma = gemma  # Gemma's norms (epsilon named eps), four of them a layer

    def norm(self, x: torch.Tensor, module: Any) -> torch.Tensor:
        """``module`` (an RMSNorm of the model's) applied to ``x`` by the picked kernel."""
        return self.rms_norm(x, module.weight, module.eps if self.gemma else module.variance_epsilon)


Part = Callable[..., torch.Tensor]  # _layer or one of its halves: (layer, x, cos, sin, flat, ops) -> x


def _checkpointed(
    part: Part, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: Flat, ops: _Ops
) -> torch.Tensor:
    return checkpoint(part, layer, x, cos, sin, flat, ops, use_reentrant=False)


def keeps_attention(lm: Any, options: Options, device: torch.device) -> bool:
    """Whether checkpointed attention halves keep their projections' and attention's outputs (in
    CPU memory) rather than recompute them: compiled halves, offloading, not a 4-bit base (not measured)."""
    return (
        options.keep
        and options.split
        and offloads(options, device)
        and compiles_layers(options, device)
        and getattr(lm, "hf_quantizer", None) is None
    )


def offloads(options: Options, device: torch.device) -> bool:
    """Whether checkpointed layers' inputs wait in CPU memory: on a GPU (a CPU has nowhere to move them)."""
    return options.offload and device.type == "cuda"


def _offloader(options: Options, device: torch.device, *shared: torch.Tensor) -> Offloader | None:
    """An offloader for one forward when offloading; it moves neither weights nor ``shared``."""
    return Offloader(device, shared) if offloads(options, device) else None


def _checkpointed_4bit(
    part: Part, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: Flat, ops: _Ops
) -> torch.Tensor:
    """The checkpointed layer of a 4-bit base, for compiling. Compiled around a plain checkpoint,
    the backward kept the forward's dequantized weights (its own dequantization of the same
    weights was merged with the forward's): 8B QLoRA 8.5 -> 18.0 GiB on the H100. Marking
    bitsandbytes' operations as ones to recompute keeps only the 4-bit weights (7.5 GiB)."""
    return checkpoint(
        part, layer, x, cos, sin, flat, ops, use_reentrant=False, context_fn=_recompute_bitsandbytes
    )


def _recompute_bitsandbytes() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy)


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    if str(op).startswith("bitsandbytes."):
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_attention(
    part: Part, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: Flat, ops: _Ops
) -> torch.Tensor:
    """The attention half, checkpointed but for the outputs of its base projections and of the
    attention itself, which are kept: the backward recomputes only the norm, LoRA's low-rank
    products and the rotary embedding. For an 8B layer at 4,096 tokens that is 80 MB kept (q, k,
    v, the attention's output and statistics, by our count); moved to CPU memory with the half's
    input. Measured on that model (A/B of the whole step): 4.3% faster, 14 ms a step for 32 layers."""
    return checkpoint(part, layer, x, cos, sin, flat, ops, use_reentrant=False, context_fn=_keeping)


def _keeping() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_policy)


ATTENTION_OPS = ("aten._scaled_dot_product_", "aten._flash_attention_", "aten._efficient_attention_",
                 "aten._cudnn_attention_", "torch_attn._varlen_attn")  # fmt: skip
"""Operators (name prefixes) that compute attention, under ``scaled_dot_product_attention`` and
``varlen_attn``: :func:`_keep_policy` keeps their outputs."""


def _keep_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Keep attention's outputs and those of the matmuls whose two sizes are within 16x of each
    other: the base projections (a LoRA's A and B map to and from its rank: recomputed)."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op is torch.ops.aten.mm.default:
        n_in, n_out = args[1].shape
        if max(n_in, n_out) < 16 * min(n_in, n_out):
            return CheckpointPolicy.MUST_SAVE
    elif str(op).startswith(ATTENTION_OPS):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _reentrant(
    part: Part, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: Flat, ops: _Ops
) -> torch.Tensor:
    return checkpoint(part, layer, x, cos, sin, flat, ops, use_reentrant=True)


@cache
def _compiled(run: Any) -> Any:
    """``run`` compiled once; every layer reuses it (their modules are inputs, not constants).

    Beyond fusing the elementwise steps, this takes the per-operation Python and launch cost off
    the step: without it an 8B LoRA step on an H100 leaves the GPU idle about 30% of the time
    (profiled), waiting for Python to issue the step's small operations one by one. The checkpoint sits inside
    the compiled region, so the recomputation is part of the compiled backward and can never
    differ from the forward it replays."""
    compiled = torch.compile(run)

    def call(*args: Any) -> torch.Tensor:
        # floats read from the modules (LoRA scaling, norm epsilon) stay constants of the graph: a
        # model whose layers differ in LoRA scaling (alpha_pattern) recompiles per value instead of
        # turning the float into a graph input (which Inductor cannot lower inside a checkpoint)
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args)

    return call


def _layer(
    layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: Flat, ops: _Ops
) -> torch.Tensor:
    return _mlp_half(layer, _attention_half(layer, x, cos, sin, flat, ops), cos, sin, flat, ops)


def _attention_half(
    layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: Flat, ops: _Ops
) -> torch.Tensor:
    attn = layer.self_attn
    h = ops.norm(x, layer.input_layernorm)
    if hasattr(attn, "qkv_proj"):  # Phi-3: one projection, queries then keys then values
        q_size = attn.config.num_attention_heads * attn.head_dim
        kv_size = attn.num_key_value_heads * attn.head_dim
        q, k, v = ops.project([attn.qkv_proj], h)[0].split([q_size, kv_size, kv_size], dim=-1)
    else:
        q, k, v = ops.project([attn.q_proj, attn.k_proj, attn.v_proj], h)
    q, k = q.unflatten(-1, (-1, attn.head_dim)), k.unflatten(-1, (-1, attn.head_dim))
    if hasattr(attn, "q_norm"):  # Qwen3, Gemma-3: each head's query and key normed before the rotary
        q, k = ops.norm(q, attn.q_norm), ops.norm(k, attn.k_norm)
    q, k = ops.rope(q, k, cos, sin)
    v = v.unflatten(-1, (-1, attn.head_dim))
    o = attention(q, k, v, flat, attn.scaling, ops.dense, sliding_window(attn))
    o = ops.project([attn.o_proj], o.flatten(-2))[0]
    if ops.gemma:  # the attention's output normed before the residual add
        o = ops.norm(o, layer.post_attention_layernorm)
    return x + o


def _mlp_half(
    layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: Flat, ops: _Ops
) -> torch.Tensor:
    mlp = layer.mlp
    h = ops.norm(x, layer.pre_feedforward_layernorm if ops.gemma else layer.post_attention_layernorm)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: one projection, the gate's half first
        gate, up = ops.project([mlp.gate_up_proj], h)[0].chunk(2, dim=-1)
    else:
        gate, up = ops.project([mlp.gate_proj, mlp.up_proj], h)
    out = ops.project([mlp.down_proj], ops.act(gate, up))[0]
    if ops.gemma:  # the MLP's output normed before the residual add
        out = ops.norm(out, layer.post_feedforward_layernorm)
    return x + out


def _plain_project(modules: list[Any], x: torch.Tensor) -> list[torch.Tensor]:
    return [m(x) for m in modules]
