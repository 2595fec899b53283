"""What every ``danlu bench`` case is made of: the model shapes built with random weights, the data
(sentences of random "words" with Zipf frequencies, so a loss can fall), danlu's training settings
for the cases, and the timed loop that measures a path (tokens/s, peak memory, the loss per step).
:mod:`danlu.bench` runs the SFT cases, :mod:`danlu.bench_dpo` the DPO one.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from danlu.config import Config
from danlu.data.render import IGNORE
from danlu.fast import varlen

SMOKE_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    tie_word_embeddings=False,
)


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Settings:
    steps: int = 50
    warmup: int = 3
    seq: int = 2048
    batch: int = 2
    varlen_batch: int = 8
    varlen_samples: int = 400
    pack_tokens: int = 4096
    smoke: bool = False

    def __post_init__(self) -> None:
        if self.smoke:  # tiny shapes on the CPU: checks the flow in seconds
            self.seq, self.varlen_samples, self.pack_tokens = 64, 40, 256


@dataclass
class PathResult:
    path: str
    steps: int
    tokens_per_s: float
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_gib: float = 0.0
    tokens: int = 0
    mfu: float = 0.0
    grad_cosine: float | None = None  # first step's trainable gradients against the baseline's (DPO case)


def model_type_of(shape_name: str) -> str:
    """The transformers model type a shape of :data:`danlu.plan.SHAPES` is built as."""
    return "qwen2" if shape_name.startswith("qwen") else "llama"


def build(shape: dict[str, Any], model_type: str, device: str) -> Any:
    """A random-weight bf16 model of ``shape`` (the same weights every call)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **shape, max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def train_config() -> Config:
    cfg = Config()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules = 16, 32, 0.0, list(LINEARS)
    cfg.train.seed, cfg.train.lr, cfg.train.weight_decay = 0, 2e-4, 0.0
    cfg.train.gradient_checkpointing = True
    return cfg


def measure(
    label: str, model: Any, optimizer: Any, step: Callable, warm: list[dict], timed: list[dict], device: str
) -> PathResult:
    """Run the warmup batches, then time each of the others (peak memory over those only)."""
    times, losses, tokens = [], [], 0
    for i, batch in enumerate(warm + timed):
        if i == len(warm):
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = step(model, b)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # waits for the step
        sync(device)
        if i >= len(warm):
            times.append(time.perf_counter() - tic)
            tokens += sum(lengths(batch))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return PathResult(label, len(times), tokens / sum(times) if times else 0.0, times, losses, peak, tokens)


def flops(shape: dict[str, Any], batches: list[dict[str, torch.Tensor]]) -> float:
    """Model FLOPs of ``batches``: forward + input-gradient backward of the linears (2 x 2 x params
    per token) and of attention (forward 2 x 2 x L^2/2 x heads x d per causal sequence of length L,
    backward twice that)."""
    h, layers, v = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    linear = layers * (2 * h * q + 2 * h * kv + 3 * h * shape["intermediate_size"]) + h * v
    total = 0.0
    for batch in batches:
        for length in lengths(batch):
            total += 4 * linear * length + 3 * layers * 2 * q * length * length
    return total


def lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """The real sequences' lengths, padded or packed: where the fast path's flattening finds them."""
    return varlen.flatten(batch).cu_seqlens.diff().tolist()


Sample = tuple[list[int], int]  # tokens, prompt length


def vocabulary_words(vocab: int, seed: int) -> tuple[list[list[int]], list[float]]:
    rng = random.Random(seed)
    words = [[rng.randrange(3, min(vocab, 32000)) for _ in range(rng.randint(1, 3))] for _ in range(2000)]
    return words, [1 / (i + 1) for i in range(len(words))]


def sentence(rng: random.Random, words: list[list[int]], weights: list[float], n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids.extend(rng.choices(words, weights)[0])
    return ids[:n]


def random_rows(vocab: int, n: int, length: int, seed: int) -> list[Sample]:
    """``n`` rows of ``length`` tokens, all trained."""
    words, weights = vocabulary_words(vocab, seed)
    rng = random.Random(seed)
    return [(sentence(rng, words, weights, length), 0) for _ in range(n)]


def pad_rows(rows: list[Sample]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for r, (tokens, prompt) in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        mask[r, : len(tokens)] = 1
        labels[r, prompt : len(tokens)] = torch.tensor(tokens[prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
