"""The cases ``danlu bench`` runs: a model shape, what is trained, and how the batches look.

Apart from :mod:`danlu.bench` so that ``danlu bench --help`` lists them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    shape: str
    what: str
    quantization: str | None = None
    varlen: bool = False
    ablation: bool = False
    objective: str = "sft"  # dpo: TRL's DPOTrainer + peft against danlu's DPO step (bench_dpo.py)


CASES = {
    "lora-8b": Case("llama3-8b", "Llama-3-8B shape, LoRA r16 all-linear, bf16, 2 x 2048", ablation=True),
    "lora-qwen7b": Case("qwen2.5-7b", "Qwen2.5-7B shape, LoRA r16 all-linear, bf16, 2 x 2048"),
    "qlora-8b": Case("llama3-8b", "Llama-3-8B shape, QLoRA nf4 r16 all-linear, 2 x 2048", quantization="nf4"),
    "varlen-8b": Case(
        "llama3-8b",
        "Llama-3-8B shape, LoRA r16, alpaca-like lengths: baseline batch 8 padded, danlu packed to 4096",
        varlen=True,
    ),
    "dpo-8b": Case(
        "llama3-8b",
        "Llama-3-8B shape, LoRA r16, DPO: 2 pairs x (1024 prompt + 1024 reply); baseline TRL DPOTrainer + peft",
        objective="dpo",
    ),
}
