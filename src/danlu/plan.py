"""Peak GPU memory of a training run, estimated from the model's ``config.json`` before loading anything.

The estimate follows what :func:`danlu.train.train` really allocates for a Llama-family decoder
(Llama, Qwen2, Mistral, SmolLM): every term is a count of bytes, and the few constants that a
count cannot give (how much more autograd saves than the tensors named here, the CUDA context)
are fitted to measurements on an H100 and cite them. Notation, for one micro-batch:

    h = hidden_size, I = intermediate_size, L = num_hidden_layers, V = vocab_size,
    q = num_attention_heads · head_dim, k = num_key_value_heads · head_dim,
    T = batch_size · max_seq_length (tokens in a micro-batch)

    peak = weights + adapter + gradients + optimizer + activations + logits + overhead

Everything is computed for the worst micro-batch (every row full, ``max_seq_length`` tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from danlu.config import Config
from danlu.fast import CHUNK, PLAIN_LOSS_STRATEGIES

GiB = 1024**3

# --- constants checked against danlu's own training path on one H100 (benchmarks/memory_gpu.py, results in
# benchmarks/results/memory_gpu_h100.json: torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2,
# random-weight Llama-3-8B / Llama-3.2-1B shapes). max_memory_allocated, measured → estimated:
#   8B LoRA r16 2×2048 checkpointing 23.40 → 23.28 GiB; no checkpointing 53.66 → 53.53
#   8B QLoRA nf4 checkpointing 17.70 → 17.57; no checkpointing 57.46 → 57.54
#   1B full tuning 4×2048 checkpointing 29.21 → 29.00; 1B LoRA 4×2048 no checkpointing 32.95 → 32.88
# The total (with overhead) against reserved + CUDA context: −11% (full tuning) to +7%.
# ../shared/docs/ANCHORS.md measured 23.4 / 58.4 / 15.0 / 52.1 GiB for the four 8B runs through plain
# HF + PEFT: −0.5%, −8.3%, +17%, +10% here; danlu's QLoRA path keeps embeddings and lm_head in fp32.
ACT_FACTOR = 1.0
"""Measured over counted saved-for-backward bytes (:func:`layer_bytes`) with a 16-bit base: the count is exact."""
KBIT_ACT_FACTOR = 1.0
"""Same with a bitsandbytes base. Since danlu keeps its unquantized weights (and so the residual
stream and the 4-bit matmuls' inputs) in bf16, it saves what a 16-bit base does: measured 44.0 GiB
for 8B QLoRA without checkpointing, i.e. the same activations as 16-bit LoRA (53.7 GiB) less the
weights' difference."""
LOGIT_BYTES = 14
"""Bytes per (token, vocab entry) at the loss peak: bf16 logits (2) kept by the loop, their fp32
upcast's log-softmax (4), the NLL gradient (4) and the log-softmax gradient (4); see train.token_loss_sum."""
KBIT_OTHER_BYTES = 2
"""peft's prepare_model_for_kbit_training casts every unquantized parameter to fp32; danlu then
puts them all (embedding, lm_head, norms) back in the compute dtype, so they and the residual
stream stay 16-bit."""
CUDA_CONTEXT = int(0.75 * GiB)
"""CUDA context, cuBLAS workspaces and kernels, outside torch's allocator: measured 0.75 GiB."""
FRAGMENTATION = 0.10
"""Reserved over allocated in the loop: measured 3% to 23% (mean 10%) over the six runs above."""

_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "head_dim", "vocab_size", "tie_word_embeddings")  # fmt: skip
SHAPES: dict[str, dict[str, Any]] = {  # the public config.json numbers, for planning without any file
    name: dict(zip(_KEYS, values, strict=True))
    for name, values in {
        "llama3-8b": (4096, 14336, 32, 32, 8, 128, 128256, False),
        "qwen2.5-7b": (3584, 18944, 28, 28, 4, 128, 152064, False),
        "llama-1b": (2048, 8192, 16, 32, 8, 64, 128256, True),
        "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 128, 151936, True),
        "smollm2-135m": (576, 1536, 30, 9, 3, 64, 49152, True),
    }.items()
}
"""Llama-3-8B, Qwen2.5-7B(-Instruct), Llama-3.2-1B, Qwen2.5-1.5B(-Instruct), SmolLM2-135M(-Instruct)."""

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZER_STATES = {
    "adamw": 2.0,
    "paged_adamw_32bit": 2.0,
    "adamw_8bit": 0.5,
    "paged_adamw_8bit": 0.5,
    "sgd": 1,
}
"""Optimizer state per trainable parameter, in multiples of one fp32 value (AdamW: m and v)."""


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder's config.json that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict | Any) -> Shape:
        """Read a ``config.json`` dict or a transformers ``PretrainedConfig``."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        if get("text_config") is not None and get("hidden_size") is None:  # multimodal wrappers
            return cls.from_config(get("text_config"))
        needed = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [k for k in needed if get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: not a Llama-family decoder")
        heads = int(get("num_attention_heads"))
        return cls(
            hidden=int(get("hidden_size")),
            intermediate=int(get("intermediate_size")),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or int(get("hidden_size")) // heads),
            vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings", False)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block."""
        h, i, q, k = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return dict(zip(names, [(h, q), (h, k), (h, k), (q, h), (h, i), (h, i), (i, h)], strict=True))

    def layer_params(self) -> int:
        """Parameters of one block: its linears plus two RMSNorm weights."""
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    def params(self) -> int:
        """All parameters: L blocks + embeddings + lm_head (unless tied) + the final norm."""
        return (
            self.layers * self.layer_params()
            + self.vocab * self.hidden * (1 if self.tied else 2)
            + self.hidden
        )


@dataclass
class Plan:
    """Estimated peak GPU memory of one training run, term by term, in bytes."""

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    apart: int
    overhead: int
    trainable: int
    params: int
    notes: list[str] = dataclasses.field(default_factory=list)

    ROWS = ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "apart", "overhead")

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated would report: all rows but the overhead."""
        return sum(getattr(self, r) for r in self.ROWS if r != "overhead")

    @property
    def total(self) -> int:
        """The peak the GPU must hold: tensors, allocator slack and the CUDA context."""
        return self.allocated + self.overhead

    def table(self) -> str:
        """The breakdown in GiB, one row per term, then the total."""
        help_ = {
            "weights": "base model as loaded",
            "adapter": "LoRA A and B matrices, fp32",
            "gradients": "one per trainable parameter",
            "optimizer": "optimizer state (AdamW: two fp32 per trainable parameter)",
            "activations": "saved for backward",
            "logits": "logits + fp32 loss buffers at the loss peak",
            "apart": "terms never alive together (loss buffers vs. gradients, recompute)",
            "overhead": "CUDA context + allocator slack",
        }
        lines = [f"  {r:12s} {getattr(self, r) / GiB:7.2f} GiB  {help_[r]}" for r in self.ROWS]
        lines.append(f"  {'total':12s} {self.total / GiB:7.2f} GiB")
        return "\n".join(lines)


def fits(plan: Plan, gpu_bytes: int) -> bool:
    """True when the estimated peak fits in ``gpu_bytes``."""
    return plan.total <= gpu_bytes


def _method(cfg: Config) -> str:
    return getattr(cfg.train, "method", "lora")


def _weight_bytes(cfg: Config) -> int:
    """Bytes per parameter of the base as train.py loads it (model.dtype, else by method and precision)."""
    by_name = {"bf16": 2, "fp16": 2, "fp32": 4}
    if cfg.model.dtype in by_name:
        return by_name[cfg.model.dtype]
    if _method(cfg) != "lora" or cfg.train.precision == "fp32":
        return 4  # full and freeze tuning keep fp32 master weights
    return 2


def _targets(cfg: Config) -> list[str]:
    names = cfg.lora.target_modules
    if names == ["all-linear"]:
        return list(LINEARS)
    return [n for n in LINEARS if any(n.endswith(t) for t in names)]


def weights_bytes(cfg: Config, s: Shape) -> int:
    r"""Bytes of the base weights.

    .. math::
        W_{16} = 2P, \qquad
        W_{nf4} = P_{lin}\,(\tfrac12 + a) + 4\,(P - P_{lin}), \qquad
        W_{int8} = P_{lin} + 4\,\textstyle\sum \text{out} + 4\,(P - P_{lin})

    with :math:`P_{lin} = L \sum_\ell \text{in}_\ell \text{out}_\ell` and the 4-bit absmax cost
    :math:`a = 4/64` per parameter (one fp32 per 64-block), or with double quantization
    :math:`a = 1/64 + 4/(64 \cdot 256)` (8-bit absmax, one fp32 per 256 of them). Embeddings,
    lm_head and norms stay unquantized, in the compute dtype (:data:`KBIT_OTHER_BYTES`).
    Whenever lm_head is fp32 (fp32 master weights for full/freeze tuning), bf16 autocast casts it
    for the logits matmul and autograd keeps that copy: :math:`+2Vh`.
    """
    lin = s.layers * sum(a * b for a, b in s.linears().values())
    rest = s.params() - lin
    quant = cfg.model.quantization
    if quant in ("nf4", "fp4"):
        absmax = 1 / 64 + 4 / (64 * 256) if cfg.model.double_quant else 4 / 64
        return int(lin * (0.5 + absmax) + rest * KBIT_OTHER_BYTES)
    if quant == "int8":
        rows = s.layers * sum(b for _, b in s.linears().values())
        return int(lin + 4 * rows + rest * KBIT_OTHER_BYTES)
    size = _weight_bytes(cfg) * s.params()
    return size + (2 * s.vocab * s.hidden if _autocast_copies(cfg) else 0)


def _autocast_copies(cfg: Config) -> bool:
    """True when bf16 autocast casts fp32 weights for every matmul (and saves the copies for backward)."""
    fp32 = cfg.model.quantization == "none" and _weight_bytes(cfg) == 4
    return fp32 and cfg.train.precision != "fp32"


def _trainable_layer_params(cfg: Config, s: Shape) -> tuple[int, int]:
    """(parameters, linear parameters) trained per trained block under method freeze."""
    mods = getattr(cfg.train, "freeze_modules", [])
    names = {f"self_attn.{n}" if n[0] in "qkvo" else f"mlp.{n}": n for n in LINEARS}
    lin = sum(
        a * b
        for full, n in names.items()
        for a, b in [s.linears()[n]]
        if not mods or any(m in full for m in mods)
    )
    norms = sum(
        s.hidden
        for n in ("input_layernorm", "post_attention_layernorm")
        if not mods or any(m in n for m in mods)
    )
    return lin + norms, lin


def _trained_linear(cfg: Config, s: Shape) -> int:
    """Linear-layer parameters inside the trained blocks (full or freeze tuning)."""
    if _method(cfg) == "full":
        return s.layers * sum(a * b for a, b in s.linears().values())
    return getattr(cfg.train, "freeze_layers", 2) * _trainable_layer_params(cfg, s)[1]


def trainable_params(cfg: Config, s: Shape) -> int:
    r"""Trainable parameters: LoRA :math:`r \sum (\text{in}+\text{out})` over targeted linears of
    every block; everything for full tuning; the last ``freeze_layers`` blocks for freeze."""
    method = _method(cfg)
    if method == "full":
        return s.params()
    if method == "freeze":
        return getattr(cfg.train, "freeze_layers", 2) * _trainable_layer_params(cfg, s)[0]
    per_layer = sum(cfg.lora.r * (a + b) for n, (a, b) in s.linears().items() if n in _targets(cfg))
    head = cfg.lora.r * (s.hidden + s.vocab) if "lm_head" in cfg.lora.target_modules else 0
    return s.layers * per_layer + head


def layer_bytes(cfg: Config, s: Shape) -> float:
    r"""Bytes saved for backward by one decoder block, per token, bf16 compute with SDPA.

    Counted tensors (:math:`c` = 2 bytes of the compute dtype):

    .. math::
        A = \underbrace{2 \cdot 4h}_{\text{RMSNorm fp32 inputs}}
          + \underbrace{c\,(2q + 2k)}_{\text{SDPA q, k, v, out}}
          + \underbrace{3cI}_{\text{SiLU in, act, up}}
          + \underbrace{\textstyle\sum_{\ell \in \text{LoRA}} (c+1)\,\text{in}_\ell}_{\text{dropout out + mask}}
          + \underbrace{\textstyle\sum_{\ell} c\,\text{in}_\ell}_{\text{4-bit matmul / trained linear inputs}}

    The frozen linears save nothing (their input gradient needs only the weight; a bitsandbytes
    4-bit matmul given bf16 inputs keeps the same tensor the norm already saved); a trained
    linear saves its input.
    The count is scaled by :data:`ACT_FACTOR` (or :data:`KBIT_ACT_FACTOR`) for what autograd
    keeps beyond it.
    """
    c = 2
    h, i, q, k = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim
    base = 8 * h + c * (2 * q + 2 * k) + 3 * c * i
    lin = s.linears()
    method = _method(cfg)
    if method == "lora":
        keep = (c + 1) if cfg.lora.dropout > 0 else c
        base += sum(keep * lin[n][0] for n in _targets(cfg))
    if method != "lora":
        base += c * (3 * h + q + 2 * h + i)  # trained linears save their q/k/v, o, gate/up, down inputs
    return base * (KBIT_ACT_FACTOR if cfg.model.quantization != "none" else ACT_FACTOR)


def estimate(cfg: Config, model_config: dict | Any) -> Plan:
    r"""Peak GPU memory of ``danlu train`` with ``cfg`` on the model that ``model_config`` describes.

    Static terms: weights (:func:`weights_bytes`), LoRA adapter (fp32, :math:`4n`), gradients
    (:math:`4n` for LoRA, the weight dtype otherwise), optimizer state
    (:data:`OPTIMIZER_STATES` × 4 bytes × n) for :math:`n` trainable parameters.

    Transient terms, with :math:`L_g` the blocks gradients flow through (all, or the last
    ``freeze_layers`` for freeze tuning), :math:`L_k` the blocks whose inputs stay on the GPU
    (:math:`L_g`, or 2 with train.fast, which keeps the others in CPU memory), :math:`A` from :func:`layer_bytes`, :math:`r` the
    residual stream's bytes (2, or 4 with fp32 master weights or a 4-bit base), :math:`G` the
    gradients:

    .. math::
        \text{logits} = 14\,T' V \ (T' = \min(T, C) \text{ with train.fast's chunked loss, else } T), \qquad
        (H, R) = \begin{cases}
          (L_g T A,\ 0) & \text{without checkpointing} \\
          (L_k T r h,\ T A) & \text{with checkpointing (inputs kept, one block recomputed)}
        \end{cases}

    The loss buffers die before backward reaches the blocks, and parameter gradients appear
    only after them (set to None each step), so the peak is

    .. math::
        \text{peak} = W + \text{adapter} + \text{optim} + \max(H + \text{logits} + [a>1]\,G,\ H + R + G)

    (:math:`a` = grad_accum: accumulated gradients outlive the micro-batch). The table shows
    :math:`H+R`, logits and :math:`G` each, and the row ``apart`` takes back what never
    coexists. Overhead: :data:`FRAGMENTATION` of the peak plus :data:`CUDA_CONTEXT`.
    """
    s = Shape.from_config(model_config)
    method = _method(cfg)
    t = cfg.train.batch_size * cfg.data.max_seq_length
    n = trainable_params(cfg, s)
    wb = _weight_bytes(cfg)
    grad_b = 4 if method == "lora" else wb
    state = OPTIMIZER_STATES.get(getattr(cfg.train, "optimizer", "adamw"), 2.0)
    opt_b = state * (4 if method == "lora" else wb)
    kbit = cfg.model.quantization != "none"
    resid = KBIT_OTHER_BYTES if kbit else wb  # the embedding's output dtype carries down the residual stream
    blocks = s.layers if method != "freeze" else min(s.layers, getattr(cfg.train, "freeze_layers", 2))
    layer = t * layer_bytes(cfg, s)
    # train.fast (not under FSDP2 or ZeRO): the loss projects at most fast.CHUNK trained tokens
    # onto the vocabulary at once
    fast = cfg.train.fast == "auto" and cfg.train.strategy not in PLAIN_LOSS_STRATEGIES
    logits = LOGIT_BYTES * (min(t, CHUNK) if fast else t) * s.vocab
    if cfg.train.gradient_checkpointing:
        # train.fast (a Llama-family decoder) keeps the layers' inputs in CPU memory: on the GPU
        # at most the one being copied out and the one coming back
        kept = min(blocks, 2) if fast else blocks
        held, recompute = kept * t * resid * s.hidden, layer
    else:  # trained fp32 weights: autocast's bf16 copies are saved for backward too
        held, recompute = blocks * layer + (2 * _trained_linear(cfg, s) if _autocast_copies(cfg) else 0), 0
    grads = grad_b * n
    at_loss = held + logits + (grads if cfg.train.grad_accum > 1 else 0)
    late = held + recompute + grads
    plan = Plan(
        weights=weights_bytes(cfg, s),
        adapter=4 * n if method == "lora" else 0,
        gradients=grads,
        optimizer=int(opt_b * n),
        activations=int(held + recompute),
        logits=int(logits),
        apart=int(max(at_loss, late) - (held + recompute + logits + grads)),
        overhead=0,
        trainable=n,
        params=s.params(),
    )
    plan.overhead = int(FRAGMENTATION * plan.allocated) + CUDA_CONTEXT
    if method == "freeze" and not hasattr(cfg.train, "freeze_layers"):
        plan.notes.append("freeze tuning assumed to train the last 2 layers")
    return plan


def _variant(cfg: Config, **changes: Any) -> Config:
    """A copy of ``cfg`` with ``section.key`` changes, e.g. ``train__batch_size=1``."""
    new = dataclasses.replace(
        cfg,
        **{
            sec: dataclasses.replace(getattr(cfg, sec))
            for sec in ("model", "data", "lora", "train", "output")
        },
    )
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(new, section), name, value)
    return new


def suggestions(cfg: Config, model_config: dict | Any, gpu_bytes: int) -> list[str]:
    """Settings that make the run fit in ``gpu_bytes``, each with its estimate; empty if it fits already.

    Each line is one option, the smallest change along one route, routes in order of what they
    cost: gradient checkpointing alone (~30% slower, same result); then smaller micro-batches with
    more accumulation (same effective batch, same result, slower); then an nf4 base (QLoRA: a
    slightly different result); then a shorter ``data.max_seq_length`` (truncates long samples).
    Every route starts with checkpointing on, since nothing else saves as much for so little.
    """
    if fits(estimate(cfg, model_config), gpu_bytes):
        return []
    ckpt = (
        []
        if cfg.train.gradient_checkpointing
        else [("train.gradient_checkpointing=true", {"train__gradient_checkpointing": True})]
    )
    halve: list[tuple[str, dict[str, Any]]] = []
    b, g = cfg.train.batch_size, cfg.train.grad_accum
    while b > 1:
        b, g = max(1, b // 2), g * 2
        halve.append(
            (f"train.batch_size={b} train.grad_accum={g}", {"train__batch_size": b, "train__grad_accum": g})
        )
    nf4 = [("model.quantization=nf4", {"model__quantization": "nf4"})]
    shorter: list[tuple[str, dict[str, Any]]] = []
    n = cfg.data.max_seq_length
    while n > 128:
        n //= 2
        shorter.append((f"data.max_seq_length={n}", {"data__max_seq_length": n}))
    routes = [ckpt, ckpt + halve]
    if cfg.model.quantization == "none" and _method(cfg) == "lora":
        routes.append(ckpt + nf4 + halve)
    routes.append(ckpt + halve + shorter)
    out: list[str] = []
    for route in routes:
        current, applied = cfg, {}
        for text, change in route:
            current = _variant(current, **change)
            applied.update(kv.split("=", 1) for kv in text.split())  # a later value wins
            plan = estimate(current, model_config)
            if fits(plan, gpu_bytes):
                line = " ".join(f"{k}={v}" for k, v in applied.items()) + f"  → {plan.total / GiB:.1f} GiB"
                if line not in out:
                    out.append(line)
                break
    return out
