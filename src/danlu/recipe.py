"""The training recipe's parts: :func:`setup` → :func:`step` → :func:`after_step` → :func:`finish`.

A run's state is one :class:`Run`; :func:`danlu.train.train` checks the config, builds the
objective and calls these in order. The *objective* (SFT in :mod:`danlu.train`, the preference
objectives in :mod:`danlu.preference`) is what a batch is and how its loss is computed; the loop,
schedules, checkpoints, exact resume, evaluation, logging and sample chats are the same for all.

An objective provides ``build`` (data → train items, eval items, summary), ``prepare`` (the
loaded model → the module the step calls, e.g. the fast path's loss), ``start`` (before the first
step), ``totals`` (a global step's normalisers), ``loss`` (one micro-batch → its share of the
step's loss and metric sums), ``metrics`` (a step's sums → logged values), ``evaluate`` and
``describe_fast``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import checkpoint, distributed, files, zero
from danlu import model as mdl
from danlu.config import CONFIG_FILENAME, Config, save_config, to_dict
from danlu.data.dataset import micro_batches
from danlu.data.templates import apply_template
from danlu.errors import UserError
from danlu.methods import make_optimizer, prepare
from danlu.tracking import NullTracker, Tracker, plot_losses

log = logging.getLogger("danlu.train")


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    eval_loss: float | None = None


@dataclass
class Run:
    """Everything a run holds between its parts."""

    cfg: Config
    out: Path
    device: str
    dtype: torch.dtype
    world: distributed.World
    objective: Any
    tokenizer: Any
    samples: list
    eval_samples: list
    base_config: Any
    model: Any
    plain: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    scaler: Any
    autocast: Any
    total: int
    first: int
    result: TrainResult
    tracker: Any = None
    batches: Any = None
    bar: Any = None
    stop_ids: list[int] = field(default_factory=list)
    zero_steps: int = 0
    start: float = 0.0


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


def setup(
    cfg: Config,
    out: Path,
    resume_from: Path | None,
    device: str,
    dtype: torch.dtype,
    world: distributed.World,
    progress: bool,
    objective: Any,
) -> Run:
    """Data, model, optimizer, schedule and the output folder (or the checkpoint to continue from)."""
    # 1) tokenizer and data; LoRA keeps the frozen base in the compute dtype, full and freeze fp32
    default_weights = dtype if cfg.train.method == "lora" else torch.float32
    weights_dtype = mdl.DTYPES.get(cfg.model.dtype, default_weights)
    quant = mdl.quantization_config(cfg.model.quantization, dtype, cfg.model.double_quant)
    ref = mdl.resolve(cfg.model.path)
    with mdl.refusing_custom_code(cfg.model.path, "set model.trust_remote_code=true"):
        tokenizer = mdl.load_tokenizer(ref, cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    with distributed.main_first(world):  # rank 0 tokenizes into the cache, the others read it
        samples, eval_samples, summary = objective.build(
            cfg.data, tokenizer, mdl.stop_token_ids(tokenizer, ref=ref)
        )
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
    try:  # the fast path's loss becomes the model's forward: DDP reduces what runs inside its forward
        model = objective.prepare(model, samples, tokenizer.pad_token_id, load_on, dtype, world)
    except torch.cuda.OutOfMemoryError:
        raise UserError(out_of_memory_advice(cfg, base.config)) from None
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
    autocast = torch.autocast(device, dtype=dtype) if use_autocast else nullcontext()
    run = Run(
        cfg, out, device, dtype, world, objective, tokenizer, samples, eval_samples, base.config, model,
        distributed.unwrap(model), params, optimizer, scheduler, scaler, autocast, total, first,
        TrainResult(out, out / "final", total),
    )  # fmt: skip
    _start(run, progress)
    return run


def _start(run: Run, progress: bool) -> None:
    """The tracker, the base model's sample answers, the fast path's log line, the batches."""
    cfg, world = run.cfg, run.world
    run.tracker = (
        Tracker(run.out, cfg.output.tensorboard, run.first, cfg.output.report_to, to_dict(cfg))
        if world.main
        else NullTracker()
    )
    run.stop_ids = sorted(mdl.stop_token_ids(run.tokenizer, run.plain))
    if cfg.train.eval_prompts and not run.first:
        samples_at(run, 0, use_adapter=False)  # the base model's answers, once, for comparison
    if cfg.train.fast == "auto":
        log.info("fast path: %s", run.objective.describe_fast(run.plain, world))
    with run.autocast:
        run.objective.start(run)
    global_batch = cfg.train.batch_size * world.size
    run.batches = micro_batches(
        run.samples, global_batch, cfg.train.seed, skip=run.first * cfg.train.grad_accum
    )
    run.bar = _bar(run.total, progress, run.first)
    run.start = time.perf_counter()


def step(run: Run, number: int) -> tuple[float, dict[str, float]]:
    """One optimizer step over ``grad_accum`` global micro-batches: the step's loss and metrics."""
    cfg, world, objective = run.cfg, run.world, run.objective
    tic = time.perf_counter()
    micro = [next(run.batches) for _ in range(cfg.train.grad_accum)]  # the global micro-batches
    totals = objective.totals(micro, world)
    loss_sum, sums = 0.0, {}
    for i, batch in enumerate(micro):
        with distributed.gradient_sync(run.model, world, sync=i == len(micro) - 1):
            with run.autocast:
                # DDP, FSDP and ZeRO average gradients over ranks: the objective scales so the step's
                # gradient is the mean over the whole global batch, as in one process
                loss, part = objective.loss(run.model, batch, totals, run.device, world)
            if world.zero:
                zero.backward(run.model, loss)
            else:
                (run.scaler.scale(loss) if run.scaler else loss).backward()
        loss_sum += loss.item() / world.size
        sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
    loss_sum = distributed.all_sum(loss_sum, world, run.device)
    _check_loss(run, number, loss_sum)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
    if world.zero:  # the engine clipped and updated after the step's last micro-batch
        grad_norm = zero.grad_norm(run.model)
    else:
        grad_norm = _step(run.optimizer, run.scaler, run.params, cfg.train.max_grad_norm)
    run.scheduler.step()
    metrics = {
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": totals["tokens"] / (time.perf_counter() - tic),
    }
    return loss_sum, {**metrics, **objective.metrics(sums, world, run.device)}


def _check_loss(run: Run, number: int, loss_sum: float) -> None:
    if not math.isfinite(loss_sum):
        kept = checkpoint.all_checkpoints(run.out)
        raise UserError(
            f"loss became {loss_sum} at step {number}; lower train.lr or check the data"
            + (f" (last good checkpoint: {kept[-1].name}, continue with --resume)" if kept else "")
        )
    run.zero_steps = run.zero_steps + 1 if loss_sum == 0.0 else 0
    if run.zero_steps == 3:
        log.warning(
            "loss has been exactly 0 for 3 steps: nothing may be trained; check the masks with `danlu data preview`"
        )


def after_step(run: Run, number: int, loss: float, metrics: dict[str, float]) -> None:
    """Log, evaluate, answer the sample prompts and save a checkpoint, each when it is due."""
    cfg, total = run.cfg, run.total
    run.result.losses.append(loss)
    if number % cfg.train.log_every == 0 or number == total:
        memory = {"gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30} if run.device == "cuda" else {}
        run.tracker.log(number, loss=loss, **metrics, **memory)
    run.bar.update(1)
    shown = {"loss": f"{loss:.4f}", "lr": f"{metrics['lr']:.2e}", "tok_s": f"{metrics['tokens_per_s']:.0f}"}
    if "rewards_accuracy" in metrics:
        shown["acc"] = f"{metrics['rewards_accuracy']:.2f}"
    if "rewards_margin" in metrics:
        shown["margin"] = f"{metrics['rewards_margin']:.3f}"
    run.bar.set_postfix(shown)
    every = cfg.train.eval_every
    if run.eval_samples and ((every and number % every == 0) or number == total):
        with run.autocast:  # every rank evaluates the whole eval split: no sync needed
            found = run.objective.evaluate(
                run.plain, run.eval_samples, cfg.train.batch_size, run.tokenizer.pad_token_id, run.device
            )
        run.result.eval_loss = found["eval_loss"]
        run.tracker.log(number, **found)
        log.info("step %d: eval loss %.4f on %d samples", number, run.result.eval_loss, len(run.eval_samples))
    prompts = cfg.train.eval_prompts
    if prompts and ((cfg.train.sample_every and number % cfg.train.sample_every == 0) or number == total):
        samples_at(run, number)
    if cfg.train.save_every and number % cfg.train.save_every == 0 and number < total:
        checkpoint.save(
            run.model,
            run.optimizer,
            run.scheduler,
            run.scaler,
            run.out,
            number,
            cfg.train.save_total_limit,
            run.world,
        )


def finish(run: Run) -> TrainResult:
    """The final adapter (plain PEFT format) or model, with the tokenizer and its chat template."""
    run.bar.close()
    result = run.result
    result.seconds = time.perf_counter() - run.start
    run.tracker.close()
    run.model.eval()
    state = distributed.full_state(run.model, run.world)  # FSDP2, ZeRO: gathered onto rank 0
    if run.world.main:
        plot_losses(run.out)
        files.atomic_dir(
            result.adapter_dir,
            lambda tmp: (
                run.plain.save_pretrained(tmp, state_dict=state),
                run.tokenizer.save_pretrained(tmp),
            ),
        )
        log.info(
            "saved %s to %s (%.1f s, final loss %.4f)",
            "adapter" if run.cfg.train.method == "lora" else "model",
            result.adapter_dir,
            result.seconds,
            result.losses[-1],
        )
    distributed.barrier(run.world)  # the others return once the final folder exists
    return result


def samples_at(run: Run, number: int, use_adapter: bool = True) -> None:
    """Greedy answers to ``train.eval_prompts``, logged and written to the metrics."""
    world, prompts = run.world, run.cfg.train.eval_prompts
    if world.strategy in ("ddp", "zero2") and not world.main:
        return  # under FSDP2 and ZeRO-3 every rank must take part in each forward
    kwargs = run.cfg.data.template_kwargs  # e.g. enable_thinking, as the data was rendered
    answers = sample_answers(run.plain, run.tokenizer, prompts, run.stop_ids, run.device, use_adapter, kwargs)
    run.tracker.log_samples(
        number, [{"prompt": q, "answer": a} for q, a in zip(prompts, answers, strict=True)]
    )
    who = "base" if not use_adapter else f"step {number}"
    for q, a in zip(prompts, answers, strict=True):
        log.info("[%s] %s → %s", who, q, " ".join(a.split())[:200])


@torch.no_grad()
def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    stop_ids: list[int],
    device: str,
    use_adapter: bool = True,
    template_kwargs: dict[str, Any] | None = None,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy answers to ``prompts`` through the chat template (XTuner's EvaluateChatHook, in-loop),
    rendered with the run's ``data.template_kwargs``."""
    was_training = model.training
    model.eval()
    context = (
        model.disable_adapter() if not use_adapter and hasattr(model, "disable_adapter") else nullcontext()
    )
    answers = []
    with context:
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                **(template_kwargs or {}),
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
