"""``danlu train``: checks, then the recipe's parts in order. The one place that wires config, data and model.

Read top to bottom: :func:`train` checks everything a user can get wrong before loading
anything heavy, then :func:`_train` runs :mod:`danlu.recipe` (setup → step → after-step → finish)
with an *objective*: :class:`SFT` here, or a preference objective (:mod:`danlu.preference`). For
SFT the loss of a step is the sum of token losses over all of its micro-batches divided by the
number of trained tokens in the step, so accumulation does not change what is learned.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from danlu import checkpoint, distributed, recipe, zero
from danlu import model as mdl
from danlu.config import CONFIG_FILENAME, Config, to_dict
from danlu.data.dataset import build, collate
from danlu.data.render import IGNORE, Sample
from danlu.errors import UserError
from danlu.fast import PLAIN_LOSS_STRATEGIES
from danlu.fast import Options as FastOptions
from danlu.fast.loss import Objective as FastObjective
from danlu.fast.loss import describe as fast_describe
from danlu.fast.loss import supports as fast_loss_supports
from danlu.recipe import (  # noqa: F401 - the recipe's names, importable from here as before
    PACKING_LEAK_LIMIT,
    TrainResult,
    check_packing,
    make_scheduler,
    out_of_memory_advice,
    plan_steps,
    sample_answers,
)
from danlu.tracking import check_report_to

log = logging.getLogger(__name__)


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


# Settings that may change between an interrupted run and its resume.
RESUMABLE_CHANGES = {
    "train.save_every",
    "train.save_total_limit",
    "train.log_every",
    "output.tensorboard",
    "data.num_proc",
    "data.cache",
    "train.strategy",
    "train.fsdp_offload",
}


def check_resume(out: Path, cfg: Config) -> Path:
    """The checkpoint to resume from; refuses when the config changed in a way that matters."""
    import yaml

    if not (out / CONFIG_FILENAME).is_file():
        raise UserError(f"--resume: {out} holds no danlu run; start one without --resume")
    found = checkpoint.all_checkpoints(out)
    if not found:
        raise UserError(f"--resume: {out} has no checkpoint yet; set train.save_every and start again")
    saved = yaml.safe_load((out / CONFIG_FILENAME).read_text(encoding="utf-8"))
    now = json.loads(json.dumps(to_dict(cfg)))
    changed = [
        f"{section}.{key}"
        for section, body in now.items()
        for key, value in body.items()
        if saved.get(section, {}).get(key) != value and f"{section}.{key}" not in RESUMABLE_CHANGES
    ]
    if changed:
        raise UserError(
            f"--resume: the config differs from the run's in {', '.join(changed)}; "
            "resume with the same config, or start a new output.dir"
        )
    return found[-1]


def train(
    cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Fine-tune ``cfg.model.path`` on ``cfg.data``; the adapter (or model) lands in OUTPUT/final.

    ``resume`` continues from the run's latest checkpoint, exactly as if it had not stopped.
    Started by torchrun (or ``danlu train --nproc N``), each process trains its share of every
    batch under DDP, FSDP2 or DeepSpeed ZeRO and rank 0 alone logs and writes.
    """
    out = Path(cfg.output.dir).expanduser().resolve()
    device, dtype = mdl.pick_device(cfg.train.precision)
    world = distributed.init(device, cfg.train.strategy)
    try:
        # 1) everything a user can get wrong, before anything heavy or anything written
        resume_from = check_resume(out, cfg) if resume else None
        check_report_to(cfg.output.report_to)
        check_strategy(cfg, world, dtype)
        if not resume:
            check_output_dir(out, overwrite)
        distributed.barrier(world)  # every rank has checked before rank 0 writes anything
        if not world.main:
            logging.getLogger("danlu").setLevel(logging.WARNING)
        return _train(cfg, out, resume_from, device, dtype, world, progress and world.main)
    finally:
        distributed.close(world)


def check_strategy(cfg: Config, world: distributed.World, dtype: torch.dtype) -> None:
    """Combinations the multi-process strategies cannot run, refused before loading."""
    if world.zero:
        zero.check(cfg, world.strategy, dtype)
        return
    if world.strategy != "fsdp":
        return
    if cfg.model.quantization != "none":
        raise UserError(
            f"model.quantization={cfg.model.quantization} cannot be sharded with train.strategy=fsdp; "
            "use train.strategy=ddp for QLoRA"
        )
    if dtype == torch.float16:
        raise UserError("train.strategy=fsdp trains in bf16 or fp32; set train.precision=bf16")


def _train(
    cfg: Config,
    out: Path,
    resume_from: Path | None,
    device: str,
    dtype: torch.dtype,
    world: distributed.World,
    progress: bool,
) -> TrainResult:
    run = recipe.setup(cfg, out, resume_from, device, dtype, world, progress, _objective(cfg))
    try:
        for number in range(run.first + 1, run.total + 1):
            loss, metrics = recipe.step(run, number)
            recipe.after_step(run, number, loss, metrics)
    except torch.cuda.OutOfMemoryError:
        raise UserError(out_of_memory_advice(cfg, run.base_config)) from None
    return recipe.finish(run)


def _objective(cfg: Config) -> Any:
    """What a batch is and how its loss is computed: SFT, or a preference objective."""
    if cfg.train.objective == "sft":
        return SFT(cfg.train.fast)
    from danlu.preference import Preference

    return Preference(cfg.train)


class SFT:
    """Next-token loss over the trained tokens; a step's loss is the sum of its micro-batches' token
    losses divided by the step's trained tokens."""

    def __init__(self, switch: str = "auto") -> None:
        self.switch = switch  # train.fast
        self.fast = False
        self.pad_id = 0

    def build(self, data: Any, tokenizer: Any, stop_ids: set[int]) -> tuple[list, list, Any]:
        return build(data, tokenizer, stop_ids)

    def prepare(
        self, model: Any, samples: list[Sample], pad_id: int, device: str, dtype: torch.dtype, world: Any
    ) -> Any:
        self.fast = (
            self.switch == "auto"
            and world.strategy not in PLAIN_LOSS_STRATEGIES
            and fast_loss_supports(model)
        )
        self.fast = self.fast and fast_loss_agrees(model, samples[:2], pad_id, device, dtype)
        self.pad_id = pad_id
        return FastObjective(model) if self.fast else model

    def describe_fast(self, plain: Any, world: Any) -> str:
        if world.strategy in PLAIN_LOSS_STRATEGIES:
            return f"not available under {world.strategy} (plain loss)"
        return fast_describe(plain)

    def start(self, run: Any) -> None:
        pass

    def totals(self, micro: list[list[Sample]], world: Any) -> dict[str, float]:
        return {
            "tokens": sum(len(s.input_ids) for batch in micro for s in batch),
            "trained": sum(_trained_tokens(s) for batch in micro for s in batch),
        }

    def loss(
        self, model: Any, batch: list[Sample], totals: dict, device: str, world: Any
    ) -> tuple[torch.Tensor, dict]:
        b = {k: v.to(device) for k, v in collate(_shard(batch, world), self.pad_id).items()}
        summed = model(b) if self.fast else token_loss_sum(forward(model, b), b["labels"])
        return summed * world.size / max(totals["trained"], 1), {}

    def metrics(self, sums: dict, world: Any, device: str) -> dict[str, float]:
        return {}

    def evaluate(self, model: Any, samples: list, batch_size: int, pad_id: int, device: str) -> dict:
        return {"eval_loss": evaluate(model, samples, batch_size, pad_id, device)}


def _trained_tokens(sample: Sample) -> int:
    """Positions the loss counts: labels after the first (each label is predicted from before it)."""
    return int((np.asarray(sample.labels[1:]) != IGNORE).sum())


def _shard(batch: list[Sample], world: distributed.World) -> list[Sample]:
    """This rank's consecutive slice of a global micro-batch. A rank left without samples (the
    last, short batch of an epoch) gets one whose labels are all masked: it still joins the
    gradient sync, and adds nothing to it."""
    if not world.active:
        return batch
    per = -(-len(batch) // world.size)
    part = batch[world.rank * per : (world.rank + 1) * per]
    return part or [replace(batch[0], labels=[IGNORE] * len(batch[0].labels))]


@torch.no_grad()
def fast_loss_agrees(model: Any, samples: list[Sample], pad_id: int, device: str, dtype: torch.dtype) -> bool:
    """The fast path's loss against the model's own forward on a couple of the run's samples (eager
    parts, dropout off): a model whose logits are not its head's output (a scale, a soft cap, a
    bias) or whose layers the fast decoder does not know gets the plain loss, with a log line."""
    if not samples:
        return True
    was_training = model.training
    model.eval()
    batch = {k: v.to(device) for k, v in collate(samples, pad_id).items()}
    eager = FastOptions(fused=False, compile=False, offload=False, split=False, keep=False)
    mixed = device == "cuda" and dtype != torch.float32
    autocast = torch.autocast("cuda", dtype=dtype) if mixed else nullcontext()
    try:
        with autocast:
            fast = float(FastObjective(model, eager)(batch))
            plain = float(token_loss_sum(forward(model, batch), batch["labels"]))
    finally:
        model.train(was_training)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if abs(fast - plain) <= tolerance * max(abs(plain), 1e-6):
        return True
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    log.info(
        "fast path: its loss differs from %s's own on the first samples (%.6g vs %.6g); using the plain loss",
        name,
        fast,
        plain,
    )
    return False


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
