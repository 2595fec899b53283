"""Preference objectives: the loss of a batch from its replies' log-probabilities.

Pure tensor math, no model and no data: :mod:`danlu.preference` gets the log-probs (policy and,
where needed, reference) and hands them here. Each function returns per-item losses (one per
pair; one per reply for KTO) with the rewards the training log shows; the recipe sums the losses
over a step's micro-batches and divides by the step's item count, so gradient accumulation does
not change what is learned.

Notation: ``logp(y|x)`` is the summed log-probability of a reply's trained tokens, ``avg`` the
same divided by their number, ``ref`` the reference model's (the base with the adapter off, or
log-probs cached before training), ``σ`` the logistic function.

- DPO (Rafailov et al. 2023, eq. 7): ``-log σ(β·((logp_c - ref_c) - (logp_r - ref_r)))``; with
  label smoothing ε, the conservative form ``-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)``. Rewards
  ``β·(logp - ref)``.
- SimPO (Meng et al. 2024, eq. 6): ``-log σ(β·(avg_c - avg_r) - γ)``, no reference; smoothed like
  DPO. Rewards ``β·avg``.
- ORPO (Hong et al. 2024, eqs. 4-7): ``NLL(chosen) - λ·log σ(log odds_c - log odds_r)`` with
  ``odds = p/(1-p)`` of the length-averaged probability; ``β`` is λ. Rewards ``β·avg``. The NLL
  part is the chosen reply's token loss, added by the caller (it is a token mean, not a pair mean).
- KTO (Ethayarajh et al. 2024, eq. 7): desirable ``w_d·(1 - σ(β·(logp - ref - z)))``, undesirable
  ``w_u·(1 - σ(β·(z - (logp - ref))))``, ``z`` the batch's KL estimate from mismatched
  prompt/reply pairs, ``max(0, mean(logp' - ref'))``, held constant (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")
PAIRED = ("dpo", "orpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
"""The papers' (and TRL's) defaults: DPO β 0.1, ORPO λ 0.1, SimPO β 2.0, KTO β 0.1."""
NEEDS_REFERENCE = ("dpo", "kto")
LENGTH_AVERAGED = ("orpo", "simpo")
"""Objectives that read a reply's mean token log-prob instead of its sum."""


@dataclass(frozen=True)
class Settings:
    """One objective and its constants (``beta`` None: the objective's default)."""

    name: str = "dpo"
    beta: float | None = None
    label_smoothing: float = 0.0
    gamma: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def b(self) -> float:
        return DEFAULT_BETA.get(self.name, 0.1) if self.beta is None else self.beta


@dataclass
class Losses:
    """Per-item losses and rewards; for KTO ``chosen``/``rejected`` are the desirable and
    undesirable replies' rewards (different counts)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-ε)·log σ(x) - ε·log σ(-x)``: the logistic loss when the label is wrong with chance ε."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def dpo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Losses:
    """DPO's sigmoid loss from summed log-probs of policy and reference."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = _smoothed(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return Losses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo(
    chosen_avg: torch.Tensor,
    rejected_avg: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> Losses:
    """SimPO from length-averaged log-probs; ``gamma`` is the target reward margin."""
    losses = _smoothed(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return Losses(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and far from it (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931472, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float = 0.1) -> Losses:
    """ORPO's odds-ratio term ``-λ·log σ(log odds ratio)`` from length-averaged log-probs."""
    c, r = chosen_avg.float(), rejected_avg.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return Losses(-beta * F.logsigmoid(log_odds), beta * c.detach(), beta * r.detach())


def kto_kl(mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z``: the mean log-ratio of mismatched pairs, at least 0, no gradient."""
    if mismatched.numel() == 0:
        return mismatched.new_zeros(())
    return (mismatched - ref_mismatched).mean().detach().clamp(min=0)


def kto(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Losses:
    """KTO's loss per reply; ``desirable`` is the records' boolean ``label``."""
    ratio = logps - ref_logps
    good = 1 - torch.sigmoid(beta * (ratio - kl))
    bad = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    rewards = beta * ratio.detach()
    return Losses(losses, rewards[desirable], rewards[~desirable])


def metric_sums(result: Losses, paired: bool) -> dict[str, float]:
    """Sums and counts of the rewards, for averaging over a step (see :func:`step_metrics`).

    Pairs count as right when the chosen reply's reward beats the rejected one's; KTO's replies
    when the reward's sign agrees with the label."""
    c, r = result.chosen_rewards.float(), result.rejected_rewards.float()
    if paired:
        right = float((c > r).sum())
    else:
        right = float((c > 0).sum() + (r < 0).sum())
    return {
        "chosen": float(c.sum()),
        "n_chosen": c.numel(),
        "rejected": float(r.sum()),
        "n_rejected": r.numel(),
        "right": right,
        "n_items": c.numel() if paired else c.numel() + r.numel(),
    }


def step_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The logged rewards of a step: mean chosen and rejected reward, their margin, accuracy."""
    out: dict[str, float] = {}
    if sums.get("n_chosen"):
        out["rewards_chosen"] = sums["chosen"] / sums["n_chosen"]
    if sums.get("n_rejected"):
        out["rewards_rejected"] = sums["rejected"] / sums["n_rejected"]
    if "rewards_chosen" in out and "rewards_rejected" in out:
        out["rewards_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    if sums.get("n_items"):
        out["rewards_accuracy"] = sums["right"] / sums["n_items"]
    return out


def add_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    """``total + part``, key by key."""
    return {k: total.get(k, 0.0) + part.get(k, 0.0) for k in {*total, *part}}
