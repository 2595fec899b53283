"""``danlu bench``'s DPO case: TRL's ``DPOTrainer`` with peft (the peers' way) against danlu's DPO step.

Both get the same batches: ``[chosen..., rejected...]`` rows of a prompt and a reply, with a
``completion_mask`` (TRL's collator layout) and labels (danlu's). The baseline is TRL's own loss
(``DPOTrainer.compute_loss``: the model's forward with its fused LM head, the reference as the
adapter disabled, gradient checkpointing as its config sets it); danlu's is what ``danlu train``
runs for ``train.objective: dpo``: both branches in one padding-free batch, the chunked per-row
log-probs, the reference as the adapter disabled, under the same compiled layers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch

from danlu import objectives
from danlu.data.render import IGNORE
from danlu.fast import Options
from danlu.fast.loss import sequence_logps

BETA = 0.1


def pair_batch(padded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A padded batch of ``[chosen..., rejected...]`` rows with TRL's ``completion_mask`` added."""
    return {**padded, "completion_mask": (padded["labels"] != IGNORE).long()}


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


def trl_model(base: Any, target_modules: list[str], bf16: bool) -> tuple[Any, Callable]:
    """TRL's DPOTrainer around ``base`` with a fresh LoRA r16 adapter: its model and its loss step."""
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
        gradient_checkpointing=True,
        report_to=[],
        seed=0,
        use_cpu=not bf16,
    )
    data = Dataset.from_list([{"prompt": "a", "chosen": "a", "rejected": "a a"}] * 2)
    trainer = DPOTrainer(
        model=base, args=args, train_dataset=data, processing_class=_tokenizer(), peft_config=lora
    )
    trainer.model.train()

    def step(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss

    return trainer.model, step


def danlu_step(options: Options) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    """danlu's DPO step (what :class:`danlu.preference.Preference` computes for LoRA)."""

    def step(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        n = rows["input_ids"].shape[0] // 2
        logps, _ = sequence_logps(model, rows, options)
        with torch.no_grad(), model.disable_adapter():
            ref, _ = sequence_logps(model, rows, options)
        loss = objectives.dpo(logps[:n], logps[n:], ref[:n], ref[n:], BETA).losses.mean()
        loss.backward()
        return loss

    return step
