"""The preference objectives: small cases by hand from the papers' formulas, and the same batch
through danlu and through TRL (installed by the ``test`` extra) on a tiny LoRA model: losses and
LoRA gradients equal within fp32 tolerance.

TRL 1.16 has DPO and KTO as trainers (driven here on the batch its own collator makes); ORPO and
SimPO (``CPOTrainer``, ``loss_type="simpo"``) are in ``trl.experimental``: their loss functions are
called on log-probs TRL's own ``get_batch_logps`` reads from the full logits, and gradients compared
through that chain. ORPO's NLL term differs on purpose: TRL's covers prompt and reply, danlu's the
chosen reply only (the trained tokens, as the paper's SFT term and danlu's SFT masks).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from danlu import objectives
from danlu.config.schema import TrainConfig
from danlu.data.preference import Labelled, Pair
from danlu.fast import ALL
from danlu.fast.loss import SequenceLogps, chunked_token_logps, sequence_logps
from danlu.preference import Preference

ONE = SimpleNamespace(active=False, size=1, rank=0, strategy="none")


# ----------------------------------------------------------------------- by hand


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_by_hand():
    out = objectives.dpo(t(-3.0), t(-5.0), t(-4.0), t(-4.5), beta=0.1)
    margin = (-3 + 4) - (-5 + 4.5)  # 1.5
    assert out.losses.item() == pytest.approx(-math.log(sig(0.1 * margin)))
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(
        -0.05
    )
    smooth = objectives.dpo(t(-3.0), t(-5.0), t(-4.0), t(-4.5), beta=0.1, label_smoothing=0.2)
    want = -0.8 * math.log(sig(0.15)) - 0.2 * math.log(sig(-0.15))
    assert smooth.losses.item() == pytest.approx(want)


def test_simpo_by_hand():
    out = objectives.simpo(t(-0.5), t(-1.5), beta=2.0, gamma=1.0)
    assert out.losses.item() == pytest.approx(-math.log(sig(2.0 * 1.0 - 1.0)))
    assert out.chosen_rewards.item() == pytest.approx(-1.0)


def test_orpo_odds_by_hand():
    c, r = -0.2, -0.9
    odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
    want = -0.1 * math.log(sig(math.log(odds(c) / odds(r))))
    assert objectives.orpo_odds(t(c), t(r), beta=0.1).losses.item() == pytest.approx(want, rel=1e-6)
    x = t(-1e-9, -0.1, -5.0, -50.0)
    assert torch.allclose(objectives.log1mexp(x)[1:], torch.log(1 - torch.exp(x[1:])))
    assert torch.isfinite(objectives.log1mexp(x)).all()


def test_kto_by_hand():
    logps, ref = t(-2.0, -3.0), t(-2.5, -2.0)
    kl = objectives.kto_kl(t(-4.0, -6.0), t(-4.5, -5.0))  # mean(0.5, -1) < 0 -> 0
    assert kl.item() == 0
    out = objectives.kto(logps, ref, torch.tensor([True, False]), t(0.2), beta=0.1, undesirable_weight=2.0)
    assert out.losses[0].item() == pytest.approx(1 - sig(0.1 * (0.5 - 0.2)))
    assert out.losses[1].item() == pytest.approx(2.0 * (1 - sig(0.1 * (0.2 - (-1.0)))))


def test_step_metrics_average_over_the_step():
    a = objectives.metric_sums(objectives.Losses(t(0), t(1.0, 2.0), t(0.0, 3.0)), paired=True)
    m = objectives.step_metrics(a)
    assert m == {
        "rewards_chosen": 1.5,
        "rewards_rejected": 1.5,
        "rewards_margin": 0.0,
        "rewards_accuracy": 0.5,
    }


def test_chunked_token_logps_and_gradients_match_log_softmax(monkeypatch):
    monkeypatch.setattr("danlu.fast.loss.CHUNK", 3)  # several chunks
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    g = torch.randn(7, dtype=torch.float64)
    ours = chunked_token_logps(h, w, y)
    (ours * g).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.log_softmax(h @ w.T, -1).gather(1, y[:, None]).squeeze(1)
    (want * g).sum().backward()
    assert torch.allclose(ours.double(), want, atol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


# -------------------------------------------------------------------- against TRL

PROMPTS = [[1, 30, 31, 32, 33], [1, 40, 41]]
CHOSEN = [[50, 51, 52, 2], [60, 2]]
REJECTED = [[70, 2], [80, 81, 82, 83, 2]]


@pytest.fixture(scope="module")
def lora_trainer(tiny_model_dir, tokenizer):
    """A factory: TRL's trainer of ``kind`` on the tiny model, its fresh adapter set to random values
    (a zero-initialised adapter would make policy and reference one model)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    def make(kind: str, tmp, **settings):
        from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
        common = dict(output_dir=str(tmp), report_to=[], use_cpu=True, per_device_train_batch_size=2)
        if kind == "dpo":
            rows = [{"prompt": "hi", "chosen": "hello", "rejected": "go"}] * 2
            trainer_cls, args = DPOTrainer, DPOConfig(**common, **settings)
        else:
            rows = [{"prompt": "hi", "completion": "hello", "label": True}] * 2
            trainer_cls, args = KTOTrainer, KTOConfig(**common, **settings)
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
        )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        return trainer

    return make


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def ours(objective: str, plain, items, fast: bool = True, **settings) -> torch.Tensor:
    pref = Preference(TrainConfig(objective=objective, **settings))
    pref.pad_id, pref.options = 0, ALL if fast else None
    pref.reference = "adapter" if objective in objectives.NEEDS_REFERENCE else "none"
    totals = {"items": len(items), "chosen_tokens": sum(len(i.chosen) for i in items if isinstance(i, Pair))}
    module = SequenceLogps(plain, pref.options) if fast else plain  # as Preference.prepare returns it
    loss, _ = pref.loss(module, items, totals, "cpu", ONE)
    return loss


def pairs() -> list[Pair]:
    a = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return [Pair(a(p), a(c), a(r)) for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)]


def assert_same_grads(mine: dict, theirs: dict) -> None:
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("settings", [{"beta": 0.1}, {"beta": 0.5}])
def test_dpo_loss_and_lora_gradients_equal_trl(lora_trainer, tmp_path, fast, settings):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer = lora_trainer("dpo", tmp_path, **settings)
    examples = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)
    ]
    theirs = trainer.compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=0)(examples))
    theirs.backward()
    their_grads = lora_grads(trainer.model)
    mine = ours("dpo", trainer.model, pairs(), fast, **settings)
    mine.backward()
    assert abs(theirs.item() - math.log(2)) > 1e-3  # policy and reference differ
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert_same_grads(lora_grads(trainer.model), their_grads)


def test_kto_loss_and_lora_gradients_equal_trl(lora_trainer, tmp_path):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    settings = {"beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 1.5}
    trainer = lora_trainer("kto", tmp_path, **settings)
    replies, labels = [CHOSEN[0], REJECTED[1]], [True, False]
    others = [replies[-1], replies[0]]  # TRL's rotation: each prompt with the previous reply
    examples = [
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": lab}
        for p, c, k, lab in zip(PROMPTS, replies, others, labels, strict=True)
    ]
    trainer.calculate_KL = True
    theirs = trainer.compute_loss(trainer.model, DataCollatorForUnpairedPreference(pad_token_id=0)(examples))
    theirs.backward()
    their_grads = lora_grads(trainer.model)
    a = lambda x: np.asarray(x, np.int32)  # noqa: E731
    items = [
        Labelled(a(p), a(c), lab, a(k)) for p, c, k, lab in zip(PROMPTS, replies, others, labels, strict=True)
    ]
    mine = ours("kto", trainer.model, items, beta=0.2, kto_desirable_weight=1.0, kto_undesirable_weight=1.5)
    mine.backward()
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert_same_grads(lora_grads(trainer.model), their_grads)


def trl_avg_logps(model, rows_batch) -> torch.Tensor:
    """TRL's own reading of length-averaged log-probs from the full logits (CPOTrainer's)."""
    from trl.experimental.cpo import CPOTrainer

    logits = model(input_ids=rows_batch["input_ids"], attention_mask=rows_batch["attention_mask"]).logits
    return CPOTrainer.get_batch_logps(logits, rows_batch["labels"], average_log_prob=True)


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_simpo_and_orpo_equal_trls_loss_functions(lora_trainer, tmp_path, objective):
    from danlu.data.dataset import collate
    from danlu.data.preference import row

    trainer = lora_trainer("dpo", tmp_path)  # a LoRA model with a random adapter; TRL's losses below
    model, items = trainer.model, pairs()
    batch = collate([row(p.prompt, p.chosen) for p in items] + [row(p.prompt, p.rejected) for p in items], 0)
    avg = trl_avg_logps(model, batch)
    if objective == "simpo":
        from trl.experimental.cpo import CPOTrainer

        me = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.1)
        me.accelerator = SimpleNamespace(device="cpu")
        theirs = CPOTrainer.cpo_loss(me, avg[:2], avg[2:])[0].mean()
        settings = {"beta": 2.0, "simpo_gamma": 0.7, "label_smoothing": 0.1}
    else:
        from trl.experimental.orpo import ORPOTrainer

        me = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
        nll = -sequence_logps(model, batch, None)[0][:2].sum() / sum(len(c) for c in CHOSEN)
        theirs = nll - ORPOTrainer.odds_ratio_loss(me, avg[:2], avg[2:])[0].mean()
        settings = {"beta": 0.1}
    theirs.backward()
    their_grads = lora_grads(model)
    mine = ours(objective, model, items, **settings)
    mine.backward()
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert_same_grads(lora_grads(model), their_grads)
