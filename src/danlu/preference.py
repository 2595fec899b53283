"""The preference objectives (DPO, ORPO, SimPO, KTO) as the recipe's objective.

A micro-batch of pairs becomes one padded batch ``[chosen..., rejected...]`` that goes through the
model together (padding-free on the fast path), and each row's summed log-probability comes from
the chunked projection (:func:`danlu.fast.loss.sequence_logps`), never the whole logits. The loss
math is :mod:`danlu.objectives`.

The reference model, for DPO and KTO, is never a second copy: with LoRA it is the same model with
the adapter switched off (peft's ``disable_adapter``); with full or freeze tuning, the reference
log-probs of every item are computed once before the first step, kept in OUTPUT/reference_logps.json
and read back on resume. ORPO and SimPO need none. The log says which.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from danlu import distributed, objectives
from danlu.config.schema import TrainConfig
from danlu.data import preference as data
from danlu.data.dataset import collate
from danlu.data.render import Sample
from danlu.errors import UserError
from danlu.fast import ALL, PLAIN_LOSS_STRATEGIES, Options, pairs
from danlu.fast.loss import SequenceLogps, sequence_logps
from danlu.fast.loss import describe as fast_describe
from danlu.fast.loss import supports as fast_loss_supports

log = logging.getLogger("danlu.train")
REFERENCE_FILE = "reference_logps.json"
EAGER = Options(fused=False, compile=False, offload=False, split=False, keep=False)


class Preference:
    """One of ``dpo``, ``orpo``, ``simpo``, ``kto`` with its constants from ``train.*``."""

    def __init__(self, t: TrainConfig) -> None:
        self.name = t.objective
        self.settings = objectives.Settings(
            t.objective,
            t.beta,
            t.label_smoothing,
            t.simpo_gamma,
            t.kto_desirable_weight,
            t.kto_undesirable_weight,
        )
        self.switch, self.batch_size = t.fast, t.batch_size
        if self.settings.b <= 0:
            raise UserError(f"train.beta={t.beta} must be above 0 (null: the paper's default)")
        if not 0 <= t.label_smoothing < 0.5:
            raise UserError(f"train.label_smoothing={t.label_smoothing} must be at least 0 and below 0.5")
        self.options: Any = None
        self.reference = "none"
        self.pad_id = 0

    # --------------------------------------------------------------- the recipe's hooks

    def build(self, cfg: Any, tokenizer: Any, stop_ids: set[int]) -> tuple[list, list, Any]:
        if cfg.packing:
            raise UserError(
                f"data.packing=true is not available with train.objective={self.name} yet; set data.packing=false"
            )
        train, evals, summary = data.build(cfg, tokenizer, stop_ids, self.name)
        if summary.truncated:
            log.info(
                "data: %d of %d %s lost part of a reply to data.max_seq_length=%d (prompts keep their end)",
                summary.truncated,
                summary.samples,
                "labelled replies" if self.name == "kto" else "pairs",
                cfg.max_seq_length,
            )
        return train, evals, summary

    def prepare(
        self, model: Any, items: list, pad_id: int, device: str, dtype: torch.dtype, world: Any
    ) -> Any:
        self.pad_id = pad_id
        fast = (
            self.switch == "auto"
            and world.strategy not in PLAIN_LOSS_STRATEGIES
            and fast_loss_supports(model)
        )
        self.options = ALL if fast and self._fast_agrees(model, items[:2], device, dtype) else None
        # the fast path's log-probs become the forward DDP wraps; the plain path keeps the model's own
        # forward, which FSDP2 and ZeRO hook (they find the decoder layers in the model itself)
        return SequenceLogps(model, self.options) if self.options is not None else model

    @torch.no_grad()
    def _fast_agrees(self, model: Any, items: list, device: str, dtype: torch.dtype) -> bool:
        """The fast path's log-probs against the model's own logits on the first items (eager parts,
        dropout off), as SFT checks its loss: a model the fast decoder gets wrong takes the plain path."""
        if not items:
            return True
        was_training = model.training
        model.eval()
        rows = [_branch(item, k) for k in (0, 1) for item in items]
        prompts = [len(item.prompt) for item in items] if isinstance(items[0], data.Pair) else None
        batch = self._batch(rows, device, prompts)  # pairs: the shared prompt checked too
        mixed = device == "cuda" and dtype != torch.float32
        try:
            with torch.autocast("cuda", dtype=dtype) if mixed else nullcontext():
                fast = sequence_logps(model, batch, EAGER)[0]
                plain = sequence_logps(model, batch, None)[0]
        finally:
            model.train(was_training)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        if torch.allclose(fast, plain, rtol=tolerance, atol=tolerance):
            return True
        log.info(
            "fast path: its log-probs differ from the model's own on the first items; using the plain path"
        )
        return False

    def describe_fast(self, plain: Any, world: Any) -> str:
        if world.strategy in PLAIN_LOSS_STRATEGIES or self.options is None:
            return "not available here (plain log-probs from the full logits)"
        if self.name == "kto":
            together = "reply and mismatched reply in one batch"
        else:
            together = "chosen and rejected in one batch" + (
                ", each prompt once" if self.options.prefix else ""
            )
        return fast_describe(plain).replace("chunked loss", f"chunked log-probs, {together}")

    def start(self, run: Any) -> None:
        """Decide (and log) the reference; for full tuning compute or read back its log-probs."""
        if self.name not in objectives.NEEDS_REFERENCE:
            log.info("%s: no reference model needed", self.name)
            return
        if hasattr(run.plain, "disable_adapter"):
            self.reference = "adapter"
            log.info("%s reference: the base model with the adapter disabled (no second copy)", self.name)
            return
        self.reference = "cache"
        path = run.out / REFERENCE_FILE
        items = [*run.samples, *run.eval_samples]
        if run.first and path.is_file():
            values = json.loads(path.read_text(encoding="utf-8"))
        else:
            values = self._reference_values(run.plain, items, run.device)
            if run.world.main:
                path.write_text(json.dumps(values), encoding="utf-8")
        for item, value in zip(items, values, strict=True):
            item.ref = tuple(value)
        log.info(
            "%s reference: the initial model's log-probs of %d items, computed once (%s)",
            self.name,
            len(items),
            path.name,
        )

    def totals(self, micro: list[list[data.Item]], world: Any) -> dict[str, float]:
        items = [item for batch in micro for item in batch]
        rows = [row for item in items for row in data.rows_of(item)]
        chosen = sum(len(i.chosen) for i in items) if self.name == "orpo" else 0
        return {"tokens": sum(len(r.input_ids) for r in rows), "items": len(items), "chosen_tokens": chosen}

    def loss(
        self, model: Any, batch: list[data.Item], totals: dict, device: str, world: Any
    ) -> tuple[torch.Tensor, dict[str, float]]:
        part, keep = _shard(batch, world)
        policy = model if self.options is not None else lambda b: sequence_logps(model, b, None)
        result, nll = self._losses(policy, distributed.unwrap(model), part, device)
        scale = world.size * keep
        loss = result.losses.sum() * scale / max(totals["items"], 1)
        if nll is not None:  # ORPO: the chosen replies' token loss, a mean over the step's tokens
            loss = loss + nll * scale / max(totals["chosen_tokens"], 1)
        sums = objectives.metric_sums(result, self.name != "kto")
        # a rank without items still sends every key: each all_sum in metrics() is a collective
        return loss, sums if keep else dict.fromkeys(sums, 0.0)

    def metrics(self, sums: dict, world: Any, device: str) -> dict[str, float]:
        summed = {k: distributed.all_sum(float(v), world, device) for k, v in sorted(sums.items())}
        return objectives.step_metrics(summed)

    @torch.no_grad()
    def evaluate(
        self, model: Any, items: list, batch_size: int, pad_id: int, device: str
    ) -> dict[str, float]:
        """The loss over ``items`` as a step would have it (dropout off) and the rewards, as ``eval_*``."""
        was_training = model.training
        model.eval()
        policy = lambda batch: sequence_logps(model, batch, self.options)  # noqa: E731
        total, nll_total, sums = 0.0, 0.0, {}
        for i in range(0, len(items), batch_size):
            result, nll = self._losses(policy, model, items[i : i + batch_size], device)
            total += float(result.losses.sum())
            nll_total += float(nll) if nll is not None else 0.0
            sums = objectives.add_sums(sums, objectives.metric_sums(result, self.name != "kto"))
        model.train(was_training)
        loss = total / max(len(items), 1)
        if self.name == "orpo":
            loss += nll_total / max(sum(len(p.chosen) for p in items), 1)
        metrics = objectives.step_metrics(sums)
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in metrics.items()}}

    # ------------------------------------------------------------------- the math

    def _batch(
        self, rows: list[Sample], device: str, prompts: list[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """The padded batch of ``rows``; with ``prompts`` (the pairs' prompt lengths, rows laid out as
        ``[chosen..., rejected...]``) the fast path runs each pair's prompt once."""
        batch = collate(rows, self.pad_id)
        if prompts is not None:
            batch[pairs.PROMPT_LENGTHS] = pairs.prompt_lengths(prompts)
        return {k: v.to(device) for k, v in batch.items()}

    def _reference(
        self, plain: Any, items: list, device: str, batch: Callable[[], dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """The reference's log-probs of the rows ``batch()`` makes (only when they are not cached; for
        DPO the policy's own batch, whose flattening the fast path reuses: :func:`danlu.fast.pairs.flatten`)."""
        if self.reference == "cache":
            values = [item.ref[k] for k in (0, 1) for item in items]
            return torch.tensor(values, dtype=torch.float32, device=device)
        with torch.no_grad(), plain.disable_adapter():
            return sequence_logps(plain, batch(), self.options)[0]

    def _losses(
        self, policy: Callable, plain: Any, items: list, device: str
    ) -> tuple[objectives.Losses, Any]:
        """The objective's per-item losses (and ORPO's summed chosen NLL) for ``items``."""
        s, n = self.settings, len(items)
        if isinstance(items[0], data.Labelled):
            return self._kto(policy, plain, items, device), None
        rows = [data.row(p.prompt, p.chosen) for p in items] + [data.row(p.prompt, p.rejected) for p in items]
        prompts = [len(p.prompt) for p in items]
        batch = self._batch(rows, device, prompts)
        sums, counts = policy(batch)
        if self.name == "dpo":
            ref = self._reference(plain, items, device, lambda: batch)
            return objectives.dpo(sums[:n], sums[n:], ref[:n], ref[n:], s.b, s.label_smoothing), None
        avg = sums / counts.clamp(min=1)
        if self.name == "simpo":
            return objectives.simpo(avg[:n], avg[n:], s.b, s.gamma, s.label_smoothing), None
        return objectives.orpo_odds(avg[:n], avg[n:], s.b), -sums[:n].sum()

    def _kto(self, policy: Callable, plain: Any, items: list, device: str) -> objectives.Losses:
        s = self.settings
        replies = [data.row(k.prompt, k.reply) for k in items]
        others = [data.row(k.prompt, k.other) for k in items]
        logps = policy(self._batch(replies, device))[0]
        with torch.no_grad():
            mismatched = sequence_logps(plain, self._batch(others, device), self.options)[0]
        ref = self._reference(plain, items, device, lambda: self._batch(replies + others, device))
        n = len(items)
        kl = objectives.kto_kl(mismatched, ref[n:])
        desirable = torch.tensor([k.desirable for k in items], device=device)
        return objectives.kto(logps, ref[:n], desirable, kl, s.b, s.desirable_weight, s.undesirable_weight)

    @torch.no_grad()
    def _reference_values(self, plain: Any, items: list, device: str) -> list[list[float]]:
        """The initial model's log-probs of both branches of every item (dropout off)."""
        was_training = plain.training
        plain.eval()
        out = []
        for i in range(0, len(items), self.batch_size):
            part = items[i : i + self.batch_size]
            rows = [r for k in (0, 1) for item in part for r in [_branch(item, k)]]
            prompts = [len(item.prompt) for item in part] if isinstance(part[0], data.Pair) else None
            sums = sequence_logps(plain, self._batch(rows, device, prompts), self.options)[0].tolist()
            out += [[sums[j], sums[len(part) + j]] for j in range(len(part))]
        plain.train(was_training)
        return out


def _branch(item: data.Item, k: int) -> Sample:
    """Row ``k`` of an item: chosen/rejected, or the KTO reply and the mismatched one."""
    if isinstance(item, data.Pair):
        return data.row(item.prompt, item.chosen if k == 0 else item.rejected)
    return data.row(item.prompt, item.reply if k == 0 else item.other)


def _shard(batch: list, world: Any) -> tuple[list, int]:
    """This rank's slice of a global micro-batch, and 0 for a rank left without items (it runs the
    first item to join the gradient sync, its loss multiplied by 0)."""
    if not world.active:
        return batch, 1
    per = -(-len(batch) // world.size)
    part = batch[world.rank * per : (world.rank + 1) * per]
    return (part, 1) if part else (batch[:1], 0)
