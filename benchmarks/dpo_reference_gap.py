"""How far apart a fresh adapter's policy and reference log-prob sums are in bf16 (GPU).

With LoRA B at zero the policy is the reference, so DPO's first loss is log 2 in exact arithmetic.
In bf16 the policy (grad enabled, compiled, checkpointed or not) and the reference (no grad, adapter
disabled) run differently fused graphs, and sums over ~1,000 log-probs part by rounding. This
prints, on a 4-layer model of the Llama-3-8B shape (2 pairs of a shared 1,024-token prompt and
1,024-token replies), the policy-minus-reference sums with the prompt shared and run twice, with and
without checkpointing. On the H200 (2026-12-02) both gave up to about 1 nat: the spread of
``danlu bench --cases dpo-8b``'s first losses (docs/preference.md); that run was this script's uncommitted first version, this one was not run on a GPU.

    PYTHONPATH=src python3 benchmarks/dpo_reference_gap.py
"""

from __future__ import annotations

import torch

from danlu import bench_dpo
from danlu import bench_parts as parts
from danlu.fast import ALL, Options
from danlu.fast.loss import sequence_logps
from danlu.methods import prepare
from danlu.plan import SHAPES


def main() -> None:
    shape = {**SHAPES["llama3-8b"], "num_hidden_layers": 4}
    rows = parts.random_rows(shape["vocab_size"], 4, 2048, seed=1)
    half = 1024
    chosen, rejected = rows[:2], rows[2:]
    rejected = [(c[:half] + r[half:], 0) for (c, _), (r, _) in zip(chosen, rejected, strict=True)]
    padded = parts.pad_rows([(ids, half) for ids, _ in chosen + rejected])
    batch = {k: v.cuda() for k, v in bench_dpo.pair_batch(padded, [half] * 2).items()}
    for checkpointing in (True, False):
        cfg = parts.train_config()
        cfg.train.gradient_checkpointing = checkpointing
        model = prepare(parts.build(shape, "llama", "cuda"), cfg, torch.bfloat16, quantized=False)
        bench_dpo.same_start(model)
        for label, options in (("prompt once", ALL), ("prompt twice", Options(prefix=False))):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                policy = sequence_logps(model, batch, options)[0]
                with torch.no_grad(), model.disable_adapter():
                    reference = sequence_logps(model, batch, options)[0]
            gap = [round(x, 3) for x in (policy - reference).tolist()]
            print(f"checkpointing={checkpointing}, {label}: policy - reference = {gap}", flush=True)
        del model
        parts.free_memory()


if __name__ == "__main__":
    main()
