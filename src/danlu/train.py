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
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from danlu import checkpoint, distributed, files, zero
from danlu import model as mdl
from danlu.config import CONFIG_FILENAME, Config, save_config, to_dict
from danlu.data.dataset import build, collate, micro_batches
from danlu.data.render import IGNORE, Sample
from danlu.data.templates import apply_template
from danlu.errors import UserError
from danlu.fast import PLAIN_LOSS_STRATEGIES
from danlu.fast import Options as FastOptions
from danlu.fast.loss import Objective as FastObjective
from danlu.fast.loss import describe as fast_describe
from danlu.fast.loss import supports as fast_loss_supports
from danlu.methods import make_optimizer, prepare
from danlu.tracking import NullTracker, Tracker, check_report_to, plot_losses

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


def plan_steps(n_samples: int, cfg: Config, processes: int = 1) -> int:
    """Optimizer steps for the run: max_steps, or epochs over the data (the global batch is
    batch_size x processes)."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(n_samples / (t.batch_size * processes)) / t.grad_accum)
    return max(1, math.ceil(t.epochs * per_epoch))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total: int) -> Any:
    from transformers import get_scheduler

    t = cfg.train
    warmup = t.warmup_steps or int(t.warmup_ratio * total)
    return get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)


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
    # LoRA keeps the frozen base in the compute dtype; full and freeze tuning keep fp32 master weights
    default_weights = dtype if cfg.train.method == "lora" else torch.float32
    weights_dtype = mdl.DTYPES.get(cfg.model.dtype, default_weights)
    quant = mdl.quantization_config(cfg.model.quantization, dtype, cfg.model.double_quant)
    ref = mdl.resolve(cfg.model.path)
    with mdl.refusing_custom_code(cfg.model.path, "set model.trust_remote_code=true"):
        tokenizer = mdl.load_tokenizer(ref, cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    with distributed.main_first(world):  # rank 0 tokenizes into the cache, the others read it
        samples, eval_samples, summary = build(cfg.data, tokenizer, mdl.stop_token_ids(tokenizer, ref=ref))
    log.info("data %s", summary.line())

    # 2) model + adapter, optimizer, schedule
    torch.manual_seed(cfg.train.seed)
    # FSDP2 and ZeRO-3 shard from the CPU copy, so no GPU ever holds the whole model
    load_on = "cpu" if world.strategy in ("fsdp", "zero3") else device
    with mdl.refusing_custom_code(cfg.model.path, "set model.trust_remote_code=true"):
        base = mdl.load_model(ref, weights_dtype, load_on, cfg.model.trust_remote_code, quant, training=True)
    if cfg.data.packing:
        check_packing(base)
    model = prepare(base, cfg, dtype, quantized=quant is not None)
    # the fast path's loss becomes the model's forward: DDP reduces what runs inside its forward
    fast = (
        cfg.train.fast == "auto" and world.strategy not in PLAIN_LOSS_STRATEGIES and fast_loss_supports(model)
    )
    try:
        fast = fast and fast_loss_agrees(model, samples[:2], tokenizer.pad_token_id, load_on, dtype)
    except torch.cuda.OutOfMemoryError:
        raise UserError(out_of_memory_advice(cfg, base.config)) from None
    if fast:
        model = FastObjective(model)
    model = distributed.wrap(model, world, device, dtype, cfg.train.fsdp_offload)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    total = plan_steps(len(samples), cfg, world.size)
    scheduler = make_scheduler(optimizer, cfg, total)
    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
    use_autocast = device == "cuda" and dtype != torch.float32
    if world.zero:  # DeepSpeed's engine takes model and optimizer: it reduces, clips and steps
        model = zero.initialize(model, optimizer, cfg, dtype if use_autocast else None)

    # 3) the output folder, now that nothing above failed (or the checkpoint to continue from)
    first = 0
    if resume_from is not None:
        first = checkpoint.restore(resume_from, model, optimizer, scheduler, scaler, world)
        log.info("resuming from %s (step %d of %d)", resume_from.name, first, total)
    elif world.main:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        save_config(cfg, out / CONFIG_FILENAME)
        (out / "data_summary.json").write_text(json.dumps(asdict(summary), indent=2, ensure_ascii=False))
    n_trainable = sum(  # ZeRO-3 leaves each rank a slice; ds_numel is the whole
        getattr(p, "ds_numel", p.numel()) for p in distributed.unwrap(model).parameters() if p.requires_grad
    )
    log.info(
        "training %d steps on %s (%s)%s, %d trainable parameters",
        total,
        device,
        dtype,
        f" x {world.size} processes ({world.strategy})" if world.active else "",
        n_trainable,
    )

    # 4) the loop
    result = TrainResult(out, out / "final", total)
    tracker = (
        Tracker(out, cfg.output.tensorboard, first, cfg.output.report_to, to_dict(cfg))
        if world.main
        else NullTracker()
    )
    plain = distributed.unwrap(model)  # DDP's inner model: eval and sampling need no gradient sync
    stop_ids = sorted(mdl.stop_token_ids(tokenizer, plain))
    prompts = cfg.train.eval_prompts

    def samples_at(step: int, use_adapter: bool = True) -> None:
        if world.strategy in ("ddp", "zero2") and not world.main:
            return  # under FSDP2 and ZeRO-3 every rank must take part in each forward
        answers = sample_answers(plain, tokenizer, prompts, stop_ids, device, use_adapter)
        tracker.log_samples(step, [{"prompt": q, "answer": a} for q, a in zip(prompts, answers, strict=True)])
        who = "base" if not use_adapter else f"step {step}"
        for q, a in zip(prompts, answers, strict=True):
            log.info("[%s] %s → %s", who, q, " ".join(a.split())[:200])

    if prompts and not first:
        samples_at(0, use_adapter=False)  # the base model's answers, once, for comparison
    if cfg.train.fast == "auto":
        log.info(
            "fast path: %s",
            fast_describe(plain)
            if world.strategy not in PLAIN_LOSS_STRATEGIES
            else f"not available under {world.strategy} (plain loss)",
        )
    autocast = torch.autocast(device, dtype=dtype) if use_autocast else nullcontext()
    global_batch = cfg.train.batch_size * world.size
    batches = micro_batches(samples, global_batch, cfg.train.seed, skip=first * cfg.train.grad_accum)
    bar = _bar(total, progress, first)
    start = time.perf_counter()
    zero_steps = 0
    try:
        for step in range(first + 1, total + 1):
            tic = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]  # the global micro-batches
            n_tokens = sum(len(s.input_ids) for batch in micro for s in batch)
            n_trained = sum(_trained_tokens(s) for batch in micro for s in batch)
            group = [collate(_shard(batch, world), tokenizer.pad_token_id) for batch in micro]
            loss_sum = 0.0
            for i, b in enumerate(group):
                with distributed.gradient_sync(model, world, sync=i == len(group) - 1):
                    b = {k: v.to(device) for k, v in b.items()}
                    with autocast:
                        summed = model(b) if fast else token_loss_sum(forward(model, b), b["labels"])
                    # DDP, FSDP and ZeRO average gradients over ranks: scale so the step's gradient is
                    # the mean over all trained tokens of the global batch, as in one process
                    loss = summed * world.size / max(n_trained, 1)
                    if world.zero:
                        zero.backward(model, loss)
                    else:
                        (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.item() / world.size
            loss_sum = distributed.all_sum(loss_sum, world, device)
            if not math.isfinite(loss_sum):
                kept = checkpoint.all_checkpoints(out)
                raise UserError(
                    f"loss became {loss_sum} at step {step}; lower train.lr or check the data"
                    + (f" (last good checkpoint: {kept[-1].name}, continue with --resume)" if kept else "")
                )
            zero_steps = zero_steps + 1 if loss_sum == 0.0 else 0
            if zero_steps == 3:
                log.warning(
                    "loss has been exactly 0 for 3 steps: nothing may be trained; "
                    "check the masks with `danlu data preview`"
                )
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            if world.zero:  # the engine clipped and updated after the step's last micro-batch
                grad_norm = zero.grad_norm(model)
            else:
                grad_norm = _step(optimizer, scaler, params, cfg.train.max_grad_norm)
            scheduler.step()
            tokens_per_s = n_tokens / (time.perf_counter() - tic)
            result.losses.append(loss_sum)
            if step % cfg.train.log_every == 0 or step == total:
                memory = (
                    {"gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30} if device == "cuda" else {}
                )
                tracker.log(
                    step, loss=loss_sum, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s, **memory
                )
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            every = cfg.train.eval_every
            if eval_samples and ((every and step % every == 0) or step == total):
                with autocast:  # every rank evaluates the whole eval split: no sync needed
                    result.eval_loss = evaluate(
                        plain, eval_samples, cfg.train.batch_size, tokenizer.pad_token_id, device
                    )
                tracker.log(step, eval_loss=result.eval_loss)
                log.info("step %d: eval loss %.4f on %d samples", step, result.eval_loss, len(eval_samples))
            if prompts and ((cfg.train.sample_every and step % cfg.train.sample_every == 0) or step == total):
                samples_at(step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total:
                checkpoint.save(
                    model, optimizer, scheduler, scaler, out, step, cfg.train.save_total_limit, world
                )
    except torch.cuda.OutOfMemoryError:
        raise UserError(out_of_memory_advice(cfg, base.config)) from None
    bar.close()
    result.seconds = time.perf_counter() - start
    tracker.close()

    # 5) the final adapter (plain PEFT format) or model, with the tokenizer and its chat template
    model.eval()
    state = distributed.full_state(model, world)  # FSDP2, ZeRO: gathered onto rank 0
    if world.main:
        plot_losses(out)
        files.atomic_dir(
            result.adapter_dir,
            lambda tmp: (plain.save_pretrained(tmp, state_dict=state), tokenizer.save_pretrained(tmp)),
        )
        log.info(
            "saved %s to %s (%.1f s, final loss %.4f)",
            "adapter" if cfg.train.method == "lora" else "model",
            result.adapter_dir,
            result.seconds,
            result.losses[-1],
        )
    distributed.barrier(world)  # the others return once the final folder exists
    return result


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


def out_of_memory_advice(cfg: Config, model_config: Any) -> str:
    """One line for a CUDA out-of-memory stop: what the planner says would fit this GPU."""
    from danlu.plan import GiB, estimate, suggestions

    gpu = torch.cuda.get_device_properties(0).total_memory
    need = estimate(cfg, model_config).total / GiB
    fixes = suggestions(cfg, model_config, gpu)
    hint = "; or ".join(fixes[:3]) if fixes else "use a smaller model or a larger GPU"
    return (
        f"CUDA out of memory (danlu plan estimates {need:.1f} GiB for this run, the GPU has {gpu / GiB:.1f} GiB); "
        f"try: {hint}"
    )


# packed samples seeing each other this much (1: as one sequence) refuses packing
PACKING_LEAK_LIMIT = 0.5


def check_packing(model: Any) -> None:
    """Refuse ``data.packing`` for a model whose own forward lets packed samples see each other."""
    leak = mdl.packing_leak(model)
    if leak > PACKING_LEAK_LIMIT:
        raise UserError(
            f"data.packing=true: {type(model).__name__} ignores the restarting positions, so packed samples "
            f"would attend to each other (measured on this model: {leak:.0%} of a joined sequence's effect); "
            "set data.packing=false"
        )


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


@torch.no_grad()
def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    stop_ids: list[int],
    device: str,
    use_adapter: bool = True,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy answers to ``prompts`` through the chat template (XTuner's EvaluateChatHook, in-loop)."""
    was_training = model.training
    model.eval()
    context = (
        model.disable_adapter() if not use_adapter and hasattr(model, "disable_adapter") else nullcontext()
    )
    answers = []
    with context:
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions (fp32 for stability)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")


def _step(optimizer: Any, scaler: Any, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip, update and clear the gradients; returns the gradient norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    norm = _clip(params, max_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to ``max_norm`` (0: no clipping) and return the gradient norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a sharded norm
        norm = norm.full_tensor()
    return float(norm)


def _bar(total: int, enabled: bool, done: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
