"""Merge a LoRA adapter into its base model and write a plain Hugging Face model folder.

The recipe: load the base unquantized → attach the adapter → take reference logits on a few
rendered chats → ``merge_and_unload()`` in place → compare logits → write shards, tokenizer
(with the chat template the run trained with), generation config and a model card into a temp
folder → ``os.replace`` it onto ``--out``. Only one 16-bit copy of the weights is ever in memory.

A QLoRA adapter (the run trained on a 4-bit base) is also run on that 4-bit base, to measure how
far the merged model is from what was trained; ``base_precision="dequantized"`` merges it into
the 4-bit weights dequantized instead of the original ones (see :mod:`danlu.export.merge_4bit`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu import model as mdl
from danlu.config import CONFIG_FILENAME
from danlu.errors import UserError
from danlu.export.merge_4bit import (
    Gap,
    check_base_precision,
    dequantize_into,
    describe_gaps,
    gap,
    load_4bit,
    trained_quantization,
)
from danlu.files import atomic_dir

log = logging.getLogger(__name__)

# Parity prompts: short, and one in Chinese so multi-byte tokens are covered too. A template
# that rejects one (a system turn, say) gets it without the system turn, or not at all; one
# that renders none of them gets all of them as plain text (see :func:`render_prompts`).
PARITY_CHATS = [
    [{"role": "user", "content": "What is your name?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    [{"role": "user", "content": "用一句话介绍你自己。"}],
]

# Largest |merged − (base + adapter)| logit difference accepted, as a fraction of the logit
# scale (max |logit| of the reference, at least 1). Merging only reorders arithmetic:
# W·x + s·B(A·x) becomes (W + s·BA)·x, and the merged weight is rounded to the dtype once more.
# The two paths then round differently in every layer and the residual stream carries those
# errors forward. Measured on SmolLM2-135M (30 layers, logit scale ~39) with a random r=16
# all-linear adapter: fp32 1.1e-4 (3e-6 of the scale), fp16 0.28 (0.7%), bf16 1.6 (4%; 8 bits
# of mantissa); a 2-layer random Llama with large weights reached 7% in bf16. The limits keep
# a 2x margin or more over those. In fp32 the check catches any real merge error; in 16-bit it
# catches gross ones (NaN, a missing or double-scaled adapter on a strong adapter, a corrupted
# layer) but not an error smaller than 16-bit noise, so merge in fp32 when in doubt.
TOLERANCE = {torch.float32: 5e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@dataclass
class MergeResult:
    """What a merge wrote and how closely the merged model matches base + adapter."""

    out: Path
    dtype: torch.dtype
    max_diff: float
    tolerance: float
    adapter_effect: float
    files: list[str]
    prompts: str  # which conversations the parity check ran on, and how they were rendered
    custom_code: bool = False  # the folder carries the model's own code (auto_map): loading needs trust
    base_precision: str = "original"  # which base weights the adapter went into (see merge_4bit)
    quantized: str | None = None  # the 4-bit type the adapter trained on (QLoRA), else None
    # QLoRA: the merged model against "trained" (4-bit base + adapter) and "original" (16-bit base + adapter)
    gaps: dict[str, Gap] | None = None


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``--out`` unless ``overwrite``, and never replace a non-model folder."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder path")
    if not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it or choose another folder")
    if not (out / "config.json").is_file():
        raise UserError(f"--out {out} is not empty and is not a model folder; choose another folder")


def check_shard_size(size: str | int) -> None:
    """Fail before loading anything when ``--max-shard-size`` is not like 2GB, 500MB or 1GiB."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        ok = convert_file_size_to_int(size) > 0
    except ValueError:
        ok = False
    if not ok:
        raise UserError(
            f"--max-shard-size {size}: write a positive size with a unit, e.g. 2GB, 500MB or 1GiB"
        )


def base_dtype(ref: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model folder's config declares; fp32 when it declares none."""
    from transformers import AutoConfig

    with mdl.refusing_custom_code(ref):
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def render_prompts(tokenizer: Any) -> tuple[list[list[int]], str]:
    """Token ids of :data:`PARITY_CHATS` the tokenizer's chat template accepts, and what was used.

    Each chat goes through the template as it is, else without its system turn (templates that
    reject one, or that insist on alternating user/assistant turns); a chat rendered in neither
    form is left out. Without a template, or when it renders none, every chat is used as its
    plain text through the tokenizer. The description names what the check ran on.
    """
    n = len(PARITY_CHATS)

    def plain(why: str) -> tuple[list[list[int]], str]:
        ids = [tokenizer(" ".join(m["content"] for m in c))["input_ids"] for c in PARITY_CHATS]
        return ids, f"{n} chats as plain text ({why})"

    if not tokenizer.chat_template:
        return plain("no chat template")

    def render(chat: list[dict]) -> list[int]:
        ids = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    prompts: list[list[int]] = []
    dropped: list[str] = []  # why a system turn was dropped
    failed: list[str] = []  # why a chat was left out
    for chat in PARITY_CHATS:
        try:
            prompts.append(render(chat))
            continue
        except Exception as e:  # a template raises whatever it likes (jinja's TemplateError, mostly)
            error = _first_line(e)
        rest = [m for m in chat if m["role"] != "system"]
        if rest != chat:
            try:
                prompts.append(render(rest))
                dropped.append(error)
                continue
            except Exception as e:
                error = _first_line(e)
        failed.append(error)
    if not prompts:
        return plain(f"the chat template rendered none: {failed[0]}")
    how = f"{len(prompts)} of {n} chats" if failed else f"{n} chats"
    notes = []
    if dropped:
        notes.append(f"system turn dropped from {len(dropped)}: {dropped[0]}")
    if failed:
        notes.append(f"{len(failed)} left out: {failed[0]}")
    return prompts, f"{how} through the chat template" + (f" ({'; '.join(notes)})" if notes else "")


@torch.no_grad()
def prompt_logits(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every prompt position, one forward per prompt (no padding to get wrong)."""
    device = next(model.parameters()).device
    return [model(torch.tensor([ids], device=device)).logits[0].float() for ids in prompts]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def merge(
    adapter: str | Path,
    base: str,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    device: str = "cpu",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    base_precision: str = "original",
) -> MergeResult:
    """Merge the LoRA ``adapter`` into ``base`` and write a plain model folder at ``out``.

    The base is always loaded unquantized in ``dtype`` (default: the base's own dtype), and the
    merged weights stay in it: merging into 4-bit weights would re-quantize the sum and lose most
    of the adapter. The merge fails (:class:`UserError`, nothing written) when the merged logits
    differ from base + adapter by more than :data:`TOLERANCE` for the dtype.
    ``trust_remote_code``: the base may run its own code (a custom architecture); otherwise a
    base that needs it is refused in one line, before any weights load.
    ``base_precision``: for a QLoRA adapter, ``original`` merges into the base's own weights,
    ``dequantized`` into its 4-bit weights as training saw them; both are measured and printed.
    """
    adapter, out = Path(adapter), Path(out).expanduser().resolve()
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there; point it at OUTPUT/final")
    check_out_dir(out, overwrite)
    check_shard_size(max_shard_size)
    quant = trained_quantization(adapter)
    check_base_precision(base_precision, adapter, quant)
    ref = mdl.resolve(base)
    trust_remote_code = bool(trust_remote_code)  # never None: transformers would ask on the terminal
    dtype = dtype or base_dtype(ref, trust_remote_code)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if device == "cpu" and dtype == torch.float16:
        log.info("fp16 on the CPU is slow; consider --dtype bf16 or fp32")

    # 1) the tokenizer the run trained with: the adapter folder carries it with its chat template
    has_tok = (adapter / "tokenizer_config.json").is_file()
    tok_ref = str(adapter) if has_tok else ref
    with mdl.refusing_custom_code(tok_ref):
        tokenizer = mdl.load_tokenizer(tok_ref, trust_remote_code)

    # 2) base (unquantized) + adapter, and the logits the merged model must reproduce
    log.info("loading %s (%s) with adapter %s", ref, str(dtype).removeprefix("torch."), adapter)
    with mdl.refusing_custom_code(ref):
        base_model = mdl.load_model(ref, dtype, device, trust_remote_code)
    model = mdl.load_adapter(base_model, adapter).eval()
    prompts, used = render_prompts(tokenizer)
    original = prompt_logits(model, prompts)
    with model.disable_adapter():
        effect = max_abs_diff(original, prompt_logits(model, prompts))
    # QLoRA: what was trained (4-bit base + adapter); "dequantized" puts its weights into `model`
    trained = trained_logits(model, ref, adapter, quant, base_precision, prompts, trust_remote_code)
    expected = prompt_logits(model, prompts) if base_precision == "dequantized" else original

    # 3) merge in place (no second copy of the base) and check parity
    merged = model.merge_and_unload()
    got = prompt_logits(merged, prompts)
    diff = max_abs_diff(expected, got)
    scale = max(1.0, max(t.abs().max().item() for t in expected))
    tolerance = TOLERANCE[dtype] * scale
    what = f"dequantized {quant[0]} base" if base_precision == "dequantized" and quant else "base"
    print(
        f"parity: max |merged - ({what} + adapter)| = {diff:.3g} (tolerance {tolerance:.3g}); "
        f"the adapter itself moves logits by up to {effect:.3g}; on {used}"
    )
    if not diff <= tolerance:  # also catches NaN
        raise UserError(
            f"merge parity check failed: merged logits differ from base + adapter by {diff:.3g} "
            f"> {tolerance:.3g}; nothing was written"
        )
    gaps = None
    if trained is not None:
        gaps = {"trained": gap(got, trained), "original": gap(got, original)}
        print(describe_gaps(quant[0], dtype, base_precision, gaps))

    # 4) write everything into a temp folder next to --out, then swap it in
    out.parent.mkdir(parents=True, exist_ok=True)
    custom = bool(getattr(merged.config, "auto_map", None))  # save_pretrained copies the code too

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        write_generation_config(merged, tokenizer, tmp)
        write_model_card(
            tmp,
            title=out.name,
            base=base,
            adapter=adapter,
            dtype=dtype,
            diff=diff,
            tolerance=tolerance,
            prompts=used,
            custom_code=custom,
            gaps=describe_gaps(quant[0], dtype, base_precision, gaps) if gaps else "",
        )

    atomic_dir(out, write)
    files = sorted(p.name for p in out.iterdir())
    return MergeResult(
        out, dtype, diff, tolerance, effect, files, used, custom, base_precision, quant and quant[0], gaps
    )


def trained_logits(
    model: Any,
    ref: str,
    adapter: Path,
    quant: tuple[str, bool] | None,
    base_precision: str,
    prompts: list[list[int]],
    trust_remote_code: bool,
) -> list[torch.Tensor] | None:
    """Logits of the model the user trained (the 4-bit base + adapter) for a QLoRA adapter, else None.

    With ``dequantized``, each 4-bit weight is then copied, dequantized, into ``model``'s base.
    The 4-bit copy is freed before returning. Without bitsandbytes, ``original`` skips the
    measurement (with a log line) and ``dequantized`` is refused.
    """
    import importlib.util

    if quant is None:
        return None
    if base_precision == "original" and importlib.util.find_spec("bitsandbytes") is None:
        log.info(
            "the adapter trained on a %s base: pip install bitsandbytes to measure the merge against it",
            quant[0],
        )
        return None
    param = next(model.parameters())
    log.info("loading the %s base the adapter trained on, to compare", quant[0])
    quantized = mdl.load_adapter(
        load_4bit(ref, quant, param.dtype, param.device.type, trust_remote_code), adapter
    )
    trained = prompt_logits(quantized.eval(), prompts)
    if base_precision == "dequantized":
        dequantize_into(model, quantized)
    del quantized
    return trained


def write_generation_config(model: Any, tokenizer: Any, folder: Path) -> None:
    """generation_config.json whose eos_token_id holds every stop token (tokenizer EOS + base's)."""
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None) or GenerationConfig()
    stops = sorted(mdl.stop_token_ids(tokenizer, model))
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None and gen.bos_token_id is None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(folder)


def write_model_card(
    folder: Path,
    *,
    title: str,
    base: str,
    adapter: Path,
    dtype: torch.dtype,
    diff: float,
    tolerance: float,
    prompts: str = "",
    custom_code: bool = False,
    gaps: str = "",
) -> None:
    """A short README.md: where the model came from, the training config and the data summary."""
    run = adapter.resolve().parent
    config = run / CONFIG_FILENAME
    summary = run / "data_summary.json"
    trust = ", trust_remote_code=True" if custom_code else ""
    lines = [
        f"# {title}",
        "",
        f"Merged by danlu from base `{base}` and LoRA adapter `{adapter}` "
        f"in {str(dtype).removeprefix('torch.')}.",
        f"Parity check: max |merged - (base + adapter)| logit difference {diff:.3g} (tolerance {tolerance:.3g})"
        + (f" on {prompts}." if prompts else "."),
        *(["", "```", gaps, "```"] if gaps else []),
        "",
        f"Load it with plain transformers: `AutoModelForCausalLM.from_pretrained(FOLDER{trust})`; "
        "the tokenizer carries the chat template the run trained with."
        + (" The folder carries the model's own code (auto_map in config.json)." if custom_code else ""),
    ]
    if config.is_file():
        lines += ["", "## Training config", "", "```yaml", config.read_text(encoding="utf-8").rstrip(), "```"]
    if summary.is_file():
        data = json.loads(summary.read_text(encoding="utf-8"))
        text = json.dumps(data, indent=2, ensure_ascii=False)
        lines += ["", "## Data summary", "", "```json", text, "```"]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
