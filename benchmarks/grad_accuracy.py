"""How far each training path's bf16 gradients are from fp32 ones, on one batch of a bench shape.

    PYTHONPATH=src python benchmarks/grad_accuracy.py [--shape llama3-8b] [--layers 8] [--out FILE]

Builds the shape's random-weight model (cut to ``--layers`` decoder layers) with danlu's LoRA
(r16, all linear layers) and sets every ``lora_B`` to small random values, as after some training
(at initialisation they are zero and ``lora_A`` gets no gradient). Then, on one 2 x 2048 batch,
takes the LoRA gradients of: the peers' baseline (transformers + peft, bf16 autocast), danlu's
plain path and its fast path (bf16 autocast), and the fast path without cuDNN attention; and of
danlu's plain path in fp32 as the reference. Prints and writes each path's relative error
(norm of the difference over the norm of the reference, all LoRA gradients together).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from danlu import bench, fast
from danlu.plan import SHAPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "grad_accuracy.json"))
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape], num_hidden_layers=args.layers)
    model_type = bench.model_type_of(args.shape)
    rows = bench.random_rows(shape["vocab_size"], 2, 2048, seed=1)
    batch = {k: v.cuda() for k, v in bench.pad_rows(rows).items()}
    report = {"shape": args.shape, "layers": args.layers, "tokens": 4096, "paths": {}}

    def trained(baseline: bool) -> torch.nn.Module:
        model, _ = bench.load_path(shape, model_type, "cuda", None, None, baseline)
        generator = torch.Generator(device="cuda").manual_seed(5)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad and "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator, device="cuda") * 0.02)
        return model

    def grads(model: torch.nn.Module, step, autocast: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = step(model, batch)
        names = {
            n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad
        }
        return float(loss.detach()), {n: p.grad.float().clone() for n, p in names.items()}

    baseline = trained(True)
    results = {"baseline: transformers + peft": grads(baseline, bench.baseline_step)}
    del baseline
    bench.free_memory()
    model = trained(False)
    results["danlu plain (train.fast=off)"] = grads(model, bench.danlu_step(None))
    results["danlu fast (train.fast=auto)"] = grads(model, bench.danlu_step(fast.ALL))
    results["danlu fast without cuDNN attention"] = grads(model, bench.danlu_step(fast.Options(dense=False)))
    model.float()
    ref_loss, ref = grads(model, bench.danlu_step(None), autocast=False)
    norm = sum(float(g.norm() ** 2) for g in ref.values()) ** 0.5
    for label, (loss, g) in results.items():
        assert g.keys() == ref.keys(), label
        err = sum(float((g[n] - ref[n]).norm() ** 2) for n in ref) ** 0.5 / norm
        worst = max(float((g[n] - ref[n]).norm() / ref[n].norm()) for n in ref)
        report["paths"][label] = {"loss": loss, "grad_rel_err": err, "worst_tensor_rel_err": worst}
        print(
            f"{label:40s} loss {loss:.5f} (fp32 {ref_loss:.5f})  gradients {err:.3e} off (worst tensor {worst:.3e})"
        )
    report["fp32_loss"] = ref_loss
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
