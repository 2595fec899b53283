"""``danlu bench``'s DPO case: TRL's ``DPOTrainer`` with peft (the peers' way) against danlu's DPO step.

Both get the same batches: ``[chosen..., rejected...]`` rows of a prompt and a reply (each pair's
two rows share their prompt, as preference data does), with a ``completion_mask`` (TRL's collator
layout) and labels (danlu's). The baseline is TRL's own loss (``DPOTrainer.compute_loss``: the
model's forward with its fused LM head, the reference as the adapter disabled, gradient
checkpointing as its config sets it); danlu's is what ``danlu train`` runs for
``train.objective: dpo``: both branches in one padding-free batch with each pair's prompt run once
(:mod:`danlu.fast.pairs`), the chunked per-row log-probs, the reference as the adapter disabled,
under the same compiled layers. A middle row runs danlu with the prompt once per reply, to show
what the sharing brings. Every path starts from the same LoRA weights, so the loss curves compare,
and the first step's LoRA gradients of each path are compared with TRL's (cosine similarity).
Tokens/s count both whole rows of each pair (the data's tokens), whatever a path runs.

TRL's trainer turns gradient checkpointing on in ``Trainer.train()``, not when it is built; this case
calls ``compute_loss`` itself, so it turns it on the same way (:func:`_checkpointing_as_train_does`)
and says which baseline rows checkpoint. TRL runs both ways: with checkpointing (``DPOConfig``'s
default, the baseline) and without (like for like with danlu's default).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from danlu import bench_parts as parts
from danlu import fast, objectives
from danlu import model as mdl
from danlu.bench_cases import Case
from danlu.data.render import IGNORE
from danlu.fast import Options, pairs
from danlu.fast.loss import sequence_logps
from danlu.methods import make_optimizer, prepare
from danlu.plan import SHAPES

BETA = 0.1
LR = 1e-5
"""Every path's learning rate: a preference-tuning one (LoRA DPO runs use 5e-6 to 5e-5). At SFT's
2e-4 the first Adam step, which moves every lora_B entry by about the learning rate whatever its
gradient, took the 8B shape's loss from 0.69 to anywhere between 0.02 and 0.27 (paths computing
the same numbers differed by 2.5x: bf16 rounding decided it) and to 0 by the fourth step."""


PATHS = [  # (label, danlu's fast-path options or None for TRL, gradient checkpointing)
    ("baseline: TRL DPOTrainer + peft, checkpointing (DPOConfig's default)", None, True),
    ("TRL DPOTrainer + peft, no checkpointing", None, False),
    ("danlu fast, checkpointing, each pair's prompt run twice", fast.Options(prefix=False), True),
    ("danlu fast (train.fast=auto), checkpointing", fast.ALL, True),
    ("danlu fast (train.fast=auto), no checkpointing (danlu's default)", fast.ALL, False),
]


def case(c: Case, s: parts.Settings, device: str, peak: float, log: Callable[[str], None]) -> dict[str, Any]:
    """TRL's DPOTrainer + peft against danlu's DPO step on the same pairs, from the same LoRA start."""
    shape = parts.SMOKE_SHAPE if s.smoke else SHAPES[c.shape]
    model_type = parts.model_type_of(c.shape)
    batches = pair_batches(shape["vocab_size"], s.batch, s.steps + s.warmup, s.seq)
    warm, timed = batches[: s.warmup], batches[s.warmup :]
    results, first_grads, checkpointed = [], None, {}
    for label, options, checkpointing in PATHS:
        base = parts.build(shape, model_type, device)
        if options is None:
            trainer = trl_trainer(base, list(parts.LINEARS), device == "cuda", checkpointing)
            model, step = trainer.model, trl_step(trainer)
            checkpointed[label] = checkpoints(model)
        else:
            cfg = parts.train_config()
            cfg.train.gradient_checkpointing = checkpointing
            model = prepare(base, cfg, torch.bfloat16, quantized=False)
            step = danlu_step(options)
        same_start(model)
        optimizer = make_optimizer(
            [p for p in model.parameters() if p.requires_grad], optimizer_config(), device
        )
        grads = first_step_grads(model, step, warm[0], device)
        first_grads = grads if first_grads is None else first_grads
        res = parts.measure(label, model, optimizer, step, warm, timed, device)
        res.mfu = parts.flops(shape, timed) / sum(res.step_s) / 1e12 / peak
        res.grad_cosine = cosine(grads, first_grads)
        results.append(res)
        log(
            f"  {label}: {res.tokens_per_s:,.0f} tokens/s, MFU {res.mfu:.1%}, peak {res.peak_gib:.2f} GiB, "
            f"first-step LoRA gradient cosine to TRL's {res.grad_cosine:.5f}"
        )
        # the step (TRL's: through its trainer) holds the model too: kept, it would still hold this
        # row's 15 GiB of weights while the next row runs and counts its peak
        del model, optimizer, base, step
        trainer = None
        parts.free_memory()
    base_r, ours = results[0], results[-1]
    rel = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(ours.losses, base_r.losses, strict=False)]
    summary = {
        "speedup": ours.tokens_per_s / base_r.tokens_per_s,
        "memory_ratio": ours.peak_gib / base_r.peak_gib if base_r.peak_gib else None,
        "loss_max_rel_diff": max(rel),
        "loss_mean_rel_diff": statistics.fmean(rel),
        "lr": LR,
        "baseline_checkpointing": checkpointed,  # as the TRL model reports it, after it was turned on
        "each": {  # every other row against the baseline
            r.path: {
                "speedup": r.tokens_per_s / base_r.tokens_per_s,
                "memory_ratio": r.peak_gib / base_r.peak_gib if base_r.peak_gib else None,
            }
            for r in results[1:]
        },
    }
    log(
        f"  danlu / baseline: {summary['speedup']:.2f}x tokens/s, {summary['memory_ratio'] or 0:.2f}x peak memory"
    )
    return {"what": c.what, "shape": c.shape, "paths": [r.__dict__ for r in results], **summary}


def pair_batches(vocab: int, pairs_per_step: int, steps: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of pairs, each branch a ``seq // 2`` prompt and a ``seq // 2`` reply: chosen
    replies from one random vocabulary, rejected ones from another, so there is something to learn
    and the loss curves fall (replies of the same kind leave DPO's loss at noise)."""
    n = pairs_per_step * steps
    good = parts.random_rows(vocab, n, seq, seed=1)
    bad = parts.random_rows(vocab, n, seq, seed=2)
    half = seq // 2
    batches = []
    for i in range(0, n, pairs_per_step):
        chosen, rejected = good[i : i + pairs_per_step], bad[i : i + pairs_per_step]
        rejected = [
            (c_ids[:half] + r_ids[half:], 0) for (c_ids, _), (r_ids, _) in zip(chosen, rejected, strict=True)
        ]
        rows = parts.pad_rows([(ids, half) for ids, _ in chosen + rejected])
        batches.append(pair_batch(rows, [half] * pairs_per_step))
    return batches


def pair_batch(padded: dict[str, torch.Tensor], prompts: list[int]) -> dict[str, torch.Tensor]:
    """A padded batch of ``[chosen..., rejected...]`` rows with TRL's ``completion_mask`` and the
    pairs' prompt lengths (danlu's) added."""
    return {
        **padded,
        "completion_mask": (padded["labels"] != IGNORE).long(),
        pairs.PROMPT_LENGTHS: pairs.prompt_lengths(prompts),
    }


def same_start(model: Any) -> None:
    """Every LoRA A matrix drawn from a generator seeded by its layer and projection, every B zero:
    TRL's trainer and danlu build their adapters through different random streams."""
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            where = name[name.index("layers.") :].split(".lora_")[0]
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(where)))
            with torch.no_grad():
                if ".lora_A." in name:
                    bound = 1 / p.shape[1] ** 0.5  # peft's default (Kaiming uniform, a = sqrt(5))
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
                else:
                    p.zero_()


def _tokenizer() -> Any:
    """A tiny in-memory tokenizer: TRL's trainer wants one to prepare its dataset, which this case
    never reads (its batches are token ids already)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "a": 2, "<unk>": 3}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def optimizer_config() -> Any:
    cfg = parts.train_config()
    cfg.train.lr = LR
    return cfg


def first_step_grads(model: Any, step: Callable, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """The LoRA gradients of the first batch from the starting weights, flattened in the
    parameters' order of name (``lora_A``/``lora_B`` of each layer and projection), on the CPU."""
    b = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device, dtype=torch.bfloat16):
        step(model, b)
    named = sorted((_lora_key(n), p) for n, p in model.named_parameters() if p.requires_grad)
    flat = torch.cat([p.grad.detach().float().flatten().cpu() for _, p in named])
    model.zero_grad(set_to_none=True)
    return flat


def _lora_key(name: str) -> str:
    """A LoRA parameter's name from ``layers.`` on, without the adapter's name: the same in TRL's
    peft model and danlu's."""
    return name[name.index("layers.") :].replace(".default", "")


def checkpoints(model: Any) -> bool:
    """Whether any decoder layer of ``model`` is set to checkpoint (the flag transformers sets on them)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _checkpointing_as_train_does(trainer: Any) -> None:
    """Gradient checkpointing turned on the way ``Trainer.train()`` turns it on before its first step
    (transformers 5: ``activation_checkpointing_enable``; earlier: ``gradient_checkpointing_enable``)."""
    args = trainer.args
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    mdl.enable_checkpointing(trainer.model, kwargs or None)


def trl_trainer(base: Any, target_modules: list[str], bf16: bool, checkpointing: bool) -> Any:
    """TRL's DPOTrainer around ``base`` with a fresh LoRA r16 adapter (``.model``), ready to step."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="danlu-bench-trl-"),
        beta=BETA,
        bf16=bf16,
        gradient_checkpointing=checkpointing,
        report_to=[],
        seed=0,
        use_cpu=not bf16,
    )
    data = Dataset.from_list([{"prompt": "a", "chosen": "a", "rejected": "a a"}] * 2)
    trainer = DPOTrainer(
        model=base, args=args, train_dataset=data, processing_class=_tokenizer(), peft_config=lora
    )
    trainer.model.train()
    if checkpointing:
        _checkpointing_as_train_does(trainer)
    return trainer


def trl_loss(trainer: Any, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL's DPO loss of ``batch`` (``DPOTrainer.compute_loss``)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    return trainer.compute_loss(model, inputs)


def trl_step(trainer: Any) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    def step(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = trl_loss(trainer, model, batch)
        loss.backward()
        return loss

    return step


def danlu_step(options: Options) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    """danlu's DPO step (what :class:`danlu.preference.Preference` computes for LoRA)."""

    def step(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", pairs.PROMPT_LENGTHS)}
        n = rows["input_ids"].shape[0] // 2
        logps, _ = sequence_logps(model, rows, options)
        with torch.no_grad(), model.disable_adapter():
            ref, _ = sequence_logps(model, rows, options)
        loss = objectives.dpo(logps[:n], logps[n:], ref[:n], ref[n:], BETA).losses.mean()
        loss.backward()
        return loss

    return step
