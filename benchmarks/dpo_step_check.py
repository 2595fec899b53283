"""One DPO update, TRL's and danlu's, taken apart on the GPU: why do their loss curves part?

On the bench's 8B case (``danlu bench --cases dpo-8b``) the two start from the same LoRA weights
and their first-step gradients point the same way, yet their losses part after the first update.
This runs one step of each from the same start on the same pairs and compares: the gradients
(norms, cosine, how many entries sit below AdamW's epsilon), the updates (norms, cosine), and the
loss on the next pairs of each update as measured by each implementation's own forward, crossed
(TRL's update through danlu's forward and the other way round), and, as the truth to hold both
to, the loss of each update through the model's own forward in fp32. Prints and writes JSON::

    python3 benchmarks/dpo_step_check.py [--layers 32] [--out dpo_step_check.json]
    python3 benchmarks/dpo_step_check.py --smoke --layers 4 --hidden 512 --vocab 32000 --seq 1024  # CPU

Needs a CUDA GPU, TRL and datasets (``make gpu-bundle`` carries them).
"""

from __future__ import annotations

import argparse
import json

import torch

from danlu import bench_dpo, objectives
from danlu import bench_parts as parts
from danlu.fast import ALL
from danlu.fast.loss import sequence_logps
from danlu.methods import make_optimizer, prepare
from danlu.plan import SHAPES


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {bench_dpo._lora_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().float().flatten() for k in sorted(tensors)])


def _unflat(values: torch.Tensor, params: dict[str, torch.nn.Parameter], key: str) -> torch.Tensor:
    """Parameter ``key``'s part of ``values`` (laid out as :func:`flat` lays them)."""
    at = 0
    for k in sorted(params):
        n = params[k].numel()
        if k == key:
            return values[at : at + n].view_as(params[k])
        at += n
    raise KeyError(key)


def fp32_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The DPO loss of ``batch`` through the model's own forward (full logits), no autocast."""
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    n = rows["input_ids"].shape[0] // 2
    with torch.no_grad():
        logps, _ = sequence_logps(model, rows, None)
        with model.disable_adapter():
            ref, _ = sequence_logps(model, rows, None)
    return float(objectives.dpo(logps[:n], logps[n:], ref[:n], ref[n:], bench_dpo.BETA).losses.mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default="dpo_step_check.json")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, to check the flow")
    ap.add_argument("--seq", type=int, default=0, help="tokens a row (default 2048; 64 with --smoke)")
    ap.add_argument("--hidden", type=int, default=0, help="with --smoke: hidden size (8 heads of hidden/8)")
    ap.add_argument("--vocab", type=int, default=0, help="with --smoke: vocabulary size")
    args = ap.parse_args()
    shape = dict(parts.SMOKE_SHAPE if args.smoke else SHAPES["llama3-8b"], num_hidden_layers=args.layers)
    if args.smoke and args.hidden:
        shape.update(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=args.hidden // 8)  # fmt: skip
    if args.smoke and args.vocab:
        shape["vocab_size"] = args.vocab
    device, seq = ("cpu", args.seq or 64) if args.smoke else ("cuda", args.seq or 2048)
    first, second = (
        {k: v.to(device) for k, v in b.items()}
        for b in bench_dpo.pair_batches(shape["vocab_size"], 2, 2, seq)
    )

    trainer = bench_dpo.trl_trainer(
        parts.build(shape, "llama", device), list(parts.LINEARS), not args.smoke, True
    )
    trl_model, trl_step = trainer.model, bench_dpo.trl_step(trainer)
    cfg = parts.train_config()
    cfg.train.gradient_checkpointing = False
    danlu_model = prepare(parts.build(shape, "llama", device), cfg, torch.bfloat16, quantized=False)
    danlu_step = bench_dpo.danlu_step(ALL)

    def trl_loss(batch: dict[str, torch.Tensor]) -> float:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            return float(bench_dpo.trl_loss(trainer, trl_model, batch))

    def danlu_loss(batch: dict[str, torch.Tensor]) -> float:
        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "prompt_lengths")}
        n = rows["input_ids"].shape[0] // 2
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            logps, _ = sequence_logps(danlu_model, rows, ALL)
            with danlu_model.disable_adapter():
                ref, _ = sequence_logps(danlu_model, rows, ALL)
        return float(objectives.dpo(logps[:n], logps[n:], ref[:n], ref[n:], bench_dpo.BETA).losses.mean())

    out: dict = {
        "shape": f"{'smoke' if args.smoke else 'llama3-8b'}, {args.layers} layers",
        "lr": bench_dpo.LR,
    }
    grads, starts, updates, dtypes = {}, {}, {}, {}
    for name, model, step in (("trl", trl_model, trl_step), ("danlu", danlu_model, danlu_step)):
        bench_dpo.same_start(model)
        params = trainable(model)
        dtypes[name] = sorted({str(p.dtype) for p in params.values()})
        starts[name] = flat(params)
        optimizer = make_optimizer(list(params.values()), bench_dpo.optimizer_config(), device)
        with torch.autocast(device, dtype=torch.bfloat16):
            out[f"{name}_loss_first"] = float(step(model, first))
        grads[name] = flat({k: p.grad for k, p in params.items()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updates[name] = flat(params) - starts[name]
    g_t, g_d = grads["trl"], grads["danlu"]
    nonzero = g_t.abs() > 0
    out.update(
        trainable_dtypes=dtypes,
        same_start=bool(torch.equal(starts["trl"], starts["danlu"])),
        grad_norm={k: float(v.norm()) for k, v in grads.items()},
        grad_cosine=bench_dpo.cosine(g_t, g_d),
        grad_below_adam_eps={k: float((v[nonzero].abs() < 1e-8).float().mean()) for k, v in grads.items()},
        grad_abs_median={k: float(v[nonzero].abs().median()) for k, v in grads.items()},
        update_norm={k: float(v.norm()) for k, v in updates.items()},
        update_cosine=bench_dpo.cosine(updates["trl"], updates["danlu"]),
    )
    # each update measured by each forward on the next pairs
    out["loss_next"] = {
        "trl update, trl forward": trl_loss(second),
        "danlu update, danlu forward": danlu_loss(second),
    }
    trl_params, danlu_params = trainable(trl_model), trainable(danlu_model)
    saved = {k: p.detach().clone() for k, p in danlu_params.items()}
    with torch.no_grad():
        for k, p in danlu_params.items():
            p.copy_(trl_params[k])
    out["loss_next"]["trl update, danlu forward"] = danlu_loss(second)
    with torch.no_grad():
        for k, p in trl_params.items():
            p.copy_(saved[k])
    out["loss_next"]["danlu update, trl forward"] = trl_loss(second)
    # the truth to hold both to: each update (and the start) through the model's own forward in fp32
    updates_at = {"start": starts["danlu"], "trl": starts["trl"] + updates["trl"], "danlu": saved}
    trainer = trl_model = trl_step = trl_params = None  # TRL done: its weights freed for the fp32 copy
    parts.free_memory()
    danlu_model.float()
    out["loss_next_fp32"] = {}
    for name, values in updates_at.items():
        with torch.no_grad():
            for k, p in danlu_params.items():
                p.copy_(values[k] if isinstance(values, dict) else _unflat(values, danlu_params, k))
        out["loss_next_fp32"][f"{name} weights, plain fp32 forward"] = fp32_loss(danlu_model, second)
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
