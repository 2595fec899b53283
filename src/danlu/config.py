"""Run configuration: typed dataclasses, YAML/JSON files, dotted ``key=value`` overrides.

A config is data, never code. Every field carries its help text in ``metadata["help"]``;
``danlu train --help`` prints them all (see :func:`describe`). Values are checked against
the declared types when loaded, and every mistake is a :class:`UserError` naming the file,
line and key, with a suggestion where one exists.

Relative paths in a config file are looked up next to that file first, then in the current
folder; paths given on the command line are relative to the current folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from danlu.errors import UserError

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
        None, "chat template: null = the tokenizer's own; a name (chatml, llama3, ...) or a .jinja file"
    )
    loss_on: Literal["assistant", "last_assistant", "all"] = opt(
        "assistant", "tokens that carry loss: every assistant turn, only the last one, or every token"
    )
    max_seq_length: int = opt(1024, "longest tokenized sample; longer ones are truncated")
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


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML or JSON; None for defaults) and apply ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p} (list presets with `danlu configs list`)")
        raw, lines = _read_mapping(p)
        for dotted, value in _flatten(raw, lines, p):
            _assign(cfg, dotted, value, where=_where(p, lines.get(dotted)), base=p.parent)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"command line: override '{item}' must look like key=value, e.g. train.lr=1e-4")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:  # not YAML (e.g. "[Who are you?, x]"): take it as plain text
            value = text
        _assign(cfg, dotted.strip(), value, where="command line", base=None)
    validate(cfg)
    return cfg


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def _read_mapping(path: Path) -> tuple[dict, dict[str, int]]:
    """Parse a YAML/JSON file into a dict plus the 1-based line of every dotted key."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{line}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (model, data, lora, train, output)")
    lines: dict[str, int] = {}
    try:  # JSON is YAML too, so one walk gives line numbers for both
        _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), "", lines)
    except yaml.YAMLError:
        pass
    return data, lines


def _key_lines(node: Any, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted + ".", out)


def _flatten(raw: dict, lines: dict[str, int], path: Path) -> list[tuple[str, Any]]:
    """Turn ``{train: {lr: 1}}`` into ``[("train.lr", 1)]``; dict-typed fields stay whole."""
    items: list[tuple[str, Any]] = []
    for section, body in raw.items():
        if section in SECTIONS and body is not None and not isinstance(body, dict):
            raise UserError(f"{_where(path, lines.get(section))}: section '{section}' must be a mapping")
        if section not in SECTIONS or body is None:
            items.append((str(section), body))
            continue
        for key, value in body.items():
            items.append((f"{section}.{key}", value))
    return items


def _assign(cfg: Config, dotted: str, value: Any, *, where: str, base: Path | None) -> None:
    parts = dotted.split(".")
    section = parts[0]
    if section not in SECTIONS:
        raise UserError(f"{where}: unknown section '{section}'{_suggest(section, SECTIONS)}")
    if len(parts) == 1:
        raise UserError(
            f"{where}: '{section}' is a section; set a key such as {section}.{_first_key(section)}=..."
        )
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    key = parts[1]
    if key not in hints:
        known = [f"{section}.{k}" for k in hints]
        hint = (
            f"; did you mean '{_SYNONYMS[key]}'?" if key in _SYNONYMS else _suggest(f"{section}.{key}", known)
        )
        raise UserError(f"{where}: unknown key '{section}.{key}'{hint}")
    full = f"{section}.{key}"
    if len(parts) > 2:  # data.placeholders.name=Ada sets one entry of a dict field
        if _origin(hints[key]) is not dict:
            raise UserError(f"{where}: '{full}' has no sub-keys; set it as {full}=VALUE")
        current = dict(getattr(obj, key))
        current[".".join(parts[2:])] = _coerce(value, str, full, where)
        setattr(obj, key, current)
        return
    value = _coerce(value, hints[key], full, where)
    meta = {f.name: f.metadata for f in dataclasses.fields(obj)}[key]
    if meta.get("path") and base is not None:
        value = [_near(base, v) for v in value] if isinstance(value, list) else _near(base, value)
    setattr(obj, key, value)


def _near(base: Path, value: str) -> str:
    """A relative path (or glob) that exists next to the config file resolves there."""
    if not value or Path(value).is_absolute():
        return value
    candidate = base / value
    is_glob = any(c in value for c in "*?[")
    if candidate.exists() or (is_glob and next(iter(base.glob(value)), None) is not None):
        return str(candidate.resolve())
    return value


# Names other trainers (Hugging Face Trainer, PEFT) use for our keys. Spelling similarity alone
# gets these wrong: it offers train.warmup_ratio for train.learning_rate.
_SYNONYMS = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "output_dir": "output.dir",
}


def _first_key(section: str) -> str:
    return dataclasses.fields(SECTIONS[section])[0].name


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(choices)}"


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _describe_type(tp: Any) -> str:
    origin = _origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_describe_type(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against ``tp``, converting the obvious cases (``'2e-4'`` to a float)."""
    origin = _origin(tp)
    fail = UserError(f"{where}: {key} must be {_describe_type(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except UserError:
                continue
        raise fail
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if not value else "on") in choices:
            return "off" if not value else "on"  # YAML 1.1 reads a bare off/on as a boolean
        if value in choices:
            return value
        raise UserError(
            f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}"
            f"{_suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else ''}"
        )
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, inner, key, where) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail
        return {str(k): _coerce(v, str, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise fail
    if tp is int:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail
    if tp is float:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads 2e-4 as text; people mean a number
                return float(value)
            except ValueError:
                pass
        raise fail
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail
    raise TypeError(f"unsupported config type {tp}")


# ------------------------------------------------------------------------- checking


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    checks = [
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (t.lr > 0, "train.lr must be positive, e.g. train.lr=2e-4"),
        (t.epochs > 0 or (t.max_steps or 0) > 0, "set train.epochs > 0 or train.max_steps > 0"),
        (t.max_steps is None or t.max_steps > 0, "train.max_steps must be positive (or null to use epochs)"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 turns clipping off)"),
        (t.log_every >= 1, "train.log_every must be at least 1"),
        (t.save_every >= 0, "train.save_every must be >= 0"),
        (t.eval_every >= 0, "train.eval_every must be >= 0"),
        (t.sample_every >= 0, "train.sample_every must be >= 0"),
        (t.freeze_layers >= 1, "train.freeze_layers must be at least 1"),
        (
            all(r in ("wandb", "mlflow") for r in cfg.output.report_to),
            "output.report_to takes wandb and/or mlflow",
        ),
        (
            t.method == "lora" or cfg.model.quantization == "none",
            f"model.quantization={cfg.model.quantization} needs train.method=lora (QLoRA); full and freeze train 16/32-bit weights",
        ),
        (t.save_total_limit >= 1, "train.save_total_limit must be at least 1"),
        (cfg.lora.r >= 1, "lora.r must be at least 1"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (cfg.data.max_seq_length >= 8, "data.max_seq_length must be at least 8"),
        (
            not cfg.data.weights or len(cfg.data.weights) == len(cfg.data.path),
            "data.weights needs one weight per entry of data.path",
        ),
        (all(w > 0 for w in cfg.data.weights), "data.weights must be positive"),
        (0 <= cfg.data.eval_ratio < 1, "data.eval_ratio must be in [0, 1)"),
        (cfg.data.sample is None or cfg.data.sample > 0, "data.sample must be positive (or null for all)"),
        (cfg.data.num_proc >= 0, "data.num_proc must be >= 0 (0: one per core)"),
        (bool(cfg.output.dir), "output.dir must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"config: {message}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")


def describe() -> str:
    """Every config key with its type, default and help, for ``--help``."""
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"{section}:  {cls.__doc__.strip()}")
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = json.dumps(getattr(defaults, f.name), ensure_ascii=False)
            out.append(f"  {section}.{f.name} ({_describe_type(hints[f.name])}, default {default})")
            out.append(f"      {f.metadata['help']}")
    return "\n".join(out)
