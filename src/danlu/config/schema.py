"""The config schema: every key, its type, default and help text.

Five sections (:class:`ModelConfig`, :class:`DataConfig`, :class:`LoraConfig`,
:class:`TrainConfig`, :class:`OutputConfig`) make a :class:`Config`. Every field carries its help
text in ``metadata["help"]``; ``danlu train --help`` prints them all (see :func:`describe`).
Nothing here reads files or checks values: that is :mod:`danlu.config.loading` and
:mod:`danlu.config.checks`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_MODEL = "smollm2-135m-instruct"
CONFIG_FILENAME = "danlu_config.yaml"


def opt(default: Any, help: str, *, path: bool = False) -> Any:
    """A dataclass field with help text; ``path=True`` marks values resolved as file paths."""
    meta = {"help": help, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Which model to start from and how to load it."""

    path: str = opt(
        DEFAULT_MODEL,
        "model alias (see `danlu models`), local Hugging Face model folder, or hub id",
        path=True,
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "weight dtype when loading; auto follows train.precision"
    )
    trust_remote_code: bool = opt(
        False, "allow the model folder's own Python code to run (off unless you trust it)"
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = opt(
        "none",
        "load the base quantized with bitsandbytes: nf4/fp4 (QLoRA) or int8; the adapter trains in 16/32-bit",
    )
    double_quant: bool = opt(
        True, "4-bit only: quantize the quantization constants too (saves ~0.4 bit/param)"
    )


@dataclass
class DataConfig:
    """Where the training records come from and how they become tokens."""

    path: list[str] = opt(
        [], "training data: files (JSON, JSON Lines, Parquet, CSV), folders or globs; several mix", path=True
    )
    weights: list[float] = opt(
        [], "per path: how much of it to use (0.5 = a random half, 2 = twice); empty = all once each"
    )
    format: Literal["auto", "alpaca", "messages", "sharegpt", "conversation", "text", "completion"] = opt(
        "auto", "record format; auto detects it from each file's first record"
    )
    columns: dict[str, str] = opt(
        {}, "rename fields before reading, ours → yours, e.g. data.columns.instruction=question"
    )
    on_error: Literal["raise", "skip"] = opt(
        "raise", "a bad record stops the run (raise) or is skipped and reported (skip)"
    )
    template: str | None = opt(
        None,
        "chat template: null = the tokenizer's own; a name (chatml, llama3, ...) or a .jinja file",
        path=True,
    )
    loss_on: Literal["assistant", "last_assistant", "all"] = opt(
        "assistant", "tokens that carry loss: every assistant turn, only the last one, or every token"
    )
    max_seq_length: int = opt(
        1024, "longest tokenized sample; longer ones are truncated (text documents: see data.long_text)"
    )
    long_text: Literal["window", "truncate"] = opt(
        "window",
        "text documents (.txt/.md files, text records) longer than max_seq_length: split into windows "
        "of max_seq_length tokens, every token trained once (window), or cut (truncate)",
    )
    window_overlap: int = opt(
        0, "long_text=window: tokens each window repeats from the one before, as context (not trained twice)"
    )
    text_split: Literal["file", "blank_line"] = opt(
        "file", ".txt/.md files: one document per file, or one per block between blank lines (blank_line)"
    )
    template_kwargs: dict[str, Any] = opt(
        {}, "extra arguments for the chat template, e.g. data.template_kwargs.enable_thinking=false"
    )
    reasoning: Literal["keep", "strip"] = opt(
        "keep",
        "assistant reasoning (reasoning_content, <think> blocks): rendered as the template does (keep) "
        "or removed, training the answers only (strip)",
    )
    system: str | None = opt(
        None, "system prompt added to records that have none (null: the template's default)"
    )
    placeholders: dict[str, str] = opt(
        {}, "values for {{key}} placeholders in the data, e.g. data.placeholders.name=Ada"
    )
    replace: dict[str, str] = opt({}, "plain string replacements applied to every message, old → new")
    sample: int | None = opt(None, "use a random sample of N records (after mixing), seeded by data.seed")
    dedup: bool = opt(False, "drop records whose messages repeat an earlier record exactly")
    eval_ratio: float = opt(0.0, "hold out this fraction of records for evaluation")
    eval_path: list[str] = opt([], "evaluation data files (instead of eval_ratio)", path=True)
    seed: int = opt(42, "seed for sampling, weights and the eval split")
    packing: bool = opt(False, "pack samples into full rows; attention and positions stay within each sample")
    cache: bool = opt(True, "cache tokenized data under $DANLU_HOME/data, keyed by content and settings")
    num_proc: int = opt(0, "tokenizer processes (0: one per core)")


@dataclass
class LoraConfig:
    """The LoRA adapter that is trained (through peft)."""

    r: int = opt(8, "rank of the low-rank update")
    alpha: float = opt(16.0, "scaling numerator; the update is scaled by alpha / r")
    dropout: float = opt(0.05, "dropout on the adapter's input")
    target_modules: list[str] = opt(
        ["all-linear"], "modules to adapt: ['all-linear'] or names such as [q_proj, v_proj]"
    )
    use_dora: bool = opt(False, "DoRA: learn each weight's magnitude apart from its direction")
    use_rslora: bool = opt(
        False, "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r (stabler at high rank)"
    )


@dataclass
class TrainConfig:
    """The optimisation loop."""

    method: Literal["lora", "full", "freeze"] = opt(
        "lora", "what trains: a LoRA adapter, every weight (full), or only the last layers (freeze)"
    )
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = opt(
        "sft",
        "what is learned: sft (the replies themselves); from preference data (docs/preference.md): dpo, "
        "orpo, simpo (chosen over rejected replies), kto (replies labelled good or bad)",
    )
    beta: float | None = opt(
        None, "preference strength (DPO/KTO β, SimPO β, ORPO λ); null: the paper's, 0.1 (SimPO 2.0)"
    )
    label_smoothing: float = opt(0.0, "dpo/simpo: chance that a pair's label is wrong (conservative DPO)")
    simpo_gamma: float = opt(1.0, "simpo: target reward margin γ (the paper's γ/β = 0.5 at β = 2)")
    kto_desirable_weight: float = opt(1.0, "kto: weight of the desirable replies' loss")
    kto_undesirable_weight: float = opt(1.0, "kto: weight of the undesirable replies' loss")
    freeze_layers: int = opt(2, "method freeze: train the last N decoder layers")
    freeze_modules: list[str] = opt(
        [], "method freeze: only parameters whose name contains one of these, e.g. [mlp]; empty: whole layers"
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "sgd"] = opt(
        "adamw",
        "adamw (torch, fused on CUDA); 8-bit and paged variants from bitsandbytes; sgd (momentum 0.9)",
    )
    epochs: float = opt(3.0, "passes over the data (ignored when max_steps is set)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps; overrides epochs")
    batch_size: int = opt(4, "samples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = opt(
        "cosine", "learning-rate schedule after warmup"
    )
    warmup_steps: int = opt(0, "linear warmup steps (wins over warmup_ratio when > 0)")
    warmup_ratio: float = opt(0.0, "warmup as a fraction of all steps")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 turns clipping off)")
    seed: int = opt(42, "seed for data order, adapter init and dropout")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "compute precision; auto: bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU"
    )
    gradient_checkpointing: bool = opt(False, "recompute activations to save memory")
    log_every: int = opt(1, "log loss and learning rate every N steps")
    eval_prompts: list[str] = opt(
        [], "questions answered (greedy) at step 0 by the base and every sample_every steps"
    )
    sample_every: int = opt(0, "answer train.eval_prompts every N steps (0: at the start and the end only)")
    eval_every: int = opt(0, "evaluation loss on the eval split every N steps (0: only at the end)")
    save_every: int = opt(0, "write a checkpoint every N steps (0: only the final adapter)")
    save_total_limit: int = opt(2, "keep only the last K checkpoints")
    fast: Literal["auto", "off"] = opt(
        "auto",
        "danlu's fast path in one-process runs: padding-free decoder with variable-length attention "
        "and compiled layers (llama, mistral, qwen2), LoRA inside the matmul, a loss that never holds "
        "the whole batch's logits; off: the plain transformers path",
    )
    strategy: Literal["auto", "ddp", "fsdp", "zero2", "zero3"] = opt(
        "auto",
        "several processes (--nproc, torchrun): ddp, a model copy per GPU (LoRA, QLoRA); fsdp, FSDP2 shards "
        "(full tuning, large models); zero2/zero3, DeepSpeed ZeRO-2/3 (danlu[deepspeed] extra); auto: ddp",
    )
    fsdp_offload: bool = opt(False, "CPU offload: fsdp/zero3 shards + optimizer state, zero2 optimizer state")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = opt("out/run", "output folder: config, logs, checkpoints, final adapter")
    tensorboard: bool = opt(True, "write TensorBoard logs to OUTPUT/tb")
    report_to: list[str] = opt([], "also log to these when installed: wandb, mlflow")


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def describe_type(tp: Any) -> str:
    """A declared type in words, as ``--help`` and the loader's error messages say it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(tp, str(tp))


def describe() -> str:
    """Every config key with its type, default and help, for ``--help``."""
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"{section}:  {cls.__doc__.strip()}")
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = json.dumps(getattr(defaults, f.name), ensure_ascii=False)
            out.append(f"  {section}.{f.name} ({describe_type(hints[f.name])}, default {default})")
            out.append(f"      {f.metadata['help']}")
    return "\n".join(out)
