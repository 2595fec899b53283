"""The training recipe: setup → loop → save. The one place that wires config, data and model.

Read top to bottom: :func:`train` checks everything a user can get wrong before loading
anything heavy, then runs a plain PyTorch loop over micro-batches with gradient
accumulation. The loss of a step is the sum of token losses over all of its micro-batches
divided by the number of trained tokens in the step, so accumulation does not change what
is learned.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from danlu import model as mdl
from danlu.config import CONFIG_FILENAME, Config, save_config
from danlu.data.dataset import build, collate, micro_batches
from danlu.data.render import IGNORE, Sample
from danlu.data.templates import apply_template
from danlu.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    eval_loss: float | None = None


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; never delete a folder danlu did not write."""
    if not path.exists() or not any(path.iterdir()):
        return
    if not (path / CONFIG_FILENAME).is_file():
        raise UserError(f"output.dir {path} is not empty and holds no danlu run; choose another output.dir")
    if not overwrite:
        raise UserError(
            f"output.dir {path} already holds a run; pass --overwrite or choose another output.dir"
        )


def plan_steps(n_samples: int, cfg: Config) -> int:
    """Optimizer steps for the run: max_steps, or epochs over the data."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(n_samples / t.batch_size) / t.grad_accum)
    return max(1, math.ceil(t.epochs * per_epoch))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total: int) -> Any:
    from transformers import get_scheduler

    t = cfg.train
    warmup = t.warmup_steps or int(t.warmup_ratio * total)
    return get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def train(cfg: Config, *, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune ``cfg.model.path`` with LoRA on ``cfg.data``; the adapter lands in OUTPUT/final."""
    out = Path(cfg.output.dir).expanduser().resolve()
    # 1) everything a user can get wrong, before anything heavy or anything written
    check_output_dir(out, overwrite)
    device, dtype = mdl.pick_device(cfg.train.precision)
    weights_dtype = mdl.DTYPES.get(cfg.model.dtype, dtype)
    ref = mdl.resolve(cfg.model.path)
    tokenizer = mdl.load_tokenizer(ref, cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    samples, eval_samples, summary = build(cfg.data, tokenizer, mdl.stop_token_ids(tokenizer))
    log.info("data %s", summary.line())

    # 2) model + adapter, optimizer, schedule
    torch.manual_seed(cfg.train.seed)
    base = mdl.load_model(ref, weights_dtype, device, cfg.model.trust_remote_code)
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = cfg.lora
    model = mdl.add_lora(base, lora.r, lora.alpha, lora.dropout, lora.target_modules, cfg.train.seed)
    model.train()  # from_pretrained returns eval mode: no dropout, and checkpointing would not act
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=device == "cuda"
    )
    total = plan_steps(len(samples), cfg)
    scheduler = make_scheduler(optimizer, cfg, total)

    # 3) the output folder, now that nothing above failed
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_config(cfg, out / CONFIG_FILENAME)
    (out / "data_summary.json").write_text(json.dumps(asdict(summary), indent=2, ensure_ascii=False))
    n_trainable = sum(p.numel() for p in params)
    log.info("training %d steps on %s (%s), %d trainable parameters", total, device, dtype, n_trainable)

    # 4) the loop
    result = TrainResult(out, out / "final", total)
    logger = _Logger(out, cfg.output.tensorboard)
    use_autocast = device == "cuda" and dtype != torch.float32
    autocast = torch.autocast(device, dtype=dtype) if use_autocast else nullcontext()
    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
    batches = micro_batches(samples, cfg.train.batch_size, cfg.train.seed)
    bar = _bar(total, progress)
    start = time.perf_counter()
    for step in range(1, total + 1):
        tic = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        n_tokens = sum(len(s.input_ids) for batch in micro for s in batch)
        group = [collate(batch, tokenizer.pad_token_id) for batch in micro]
        n_trained = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
        loss_sum = 0.0
        for b in group:
            b = {k: v.to(device) for k, v in b.items()}
            with autocast:
                logits = forward(model, b)
            loss = token_loss_sum(logits, b["labels"]) / max(n_trained, 1)
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise UserError(f"loss became {loss_sum} at step {step}; lower train.lr or check the data")
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = _clip(params, cfg.train.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_per_s = n_tokens / (time.perf_counter() - tic)
        result.losses.append(loss_sum)
        if step % cfg.train.log_every == 0 or step == total:
            logger.log(step, loss=loss_sum, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total:
            save_checkpoint(model, optimizer, scheduler, out, step, cfg.train.save_total_limit)
    bar.close()
    result.seconds = time.perf_counter() - start
    if eval_samples:
        with autocast:
            result.eval_loss = evaluate(
                model, eval_samples, cfg.train.batch_size, tokenizer.pad_token_id, device
            )
        logger.log(total, eval_loss=result.eval_loss)
        log.info("eval loss %.4f on %d samples", result.eval_loss, len(eval_samples))
    logger.close()

    # 5) the final adapter, in plain PEFT format, with the tokenizer and its chat template
    model.eval()
    _atomic_dir(result.adapter_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    log.info(
        "saved adapter to %s (%.1f s, final loss %.4f)", result.adapter_dir, result.seconds, result.losses[-1]
    )
    return result


def forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for a padded batch (attention mask) or a packed one (restarting position ids).

    Packed rows go in with ``attention_mask=None``: transformers then builds the
    block-diagonal causal mask from the position ids, so samples never see each other. It
    does so only without a KV cache, hence ``use_cache=False`` (training never needs one).
    """
    if "position_ids" in batch:
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@torch.no_grad()
def evaluate(model: Any, samples: list[Sample], batch_size: int, pad_id: int, device: str) -> float:
    """Mean next-token loss over the trained tokens of ``samples`` (dropout off during it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        b = {k: v.to(device) for k, v in collate(samples[i : i + batch_size], pad_id).items()}
        total += float(token_loss_sum(forward(model, b), b["labels"]))
        count += int((b["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions (fp32 for stability)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")


def _clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def _atomic_dir(target: Path, write: Any) -> None:
    """Write into a temporary sibling folder, then rename: a crash never leaves half a folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(model: Any, optimizer: Any, scheduler: Any, out: Path, step: int, keep: int) -> Path:
    """OUTPUT/checkpoint-STEP: the adapter plus optimizer and schedule state; keeps the last ``keep``."""
    target = out / f"checkpoint-{step}"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        torch.save(state, tmp / "trainer_state.pt")

    _atomic_dir(target, write)
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[:-keep]:
        shutil.rmtree(old)
    return target


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


class _Logger:
    """Metrics to OUTPUT/metrics.jsonl and, when installed and enabled, TensorBoard."""

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tb"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.jsonl only")

    def log(self, step: int, **metrics: float) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer:
            self.writer.close()
