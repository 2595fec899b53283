"""The memory planner: against the H100 measurements it was fitted to and ANCHORS.md, out of sample
against later H200 runs, its monotonicity, its suggestions, its CLI."""

from __future__ import annotations

import re

import pytest

from danlu.app.cli import main
from danlu.app.plan_cli import parse_gpu_mem
from danlu.config import load_config
from danlu.plan import SHAPES, GiB, Shape, estimate, fits, suggestions, trainable_params

L3 = SHAPES["llama3-8b"]
ANCHOR_RUN = ["lora.r=16", "train.batch_size=2", "data.max_seq_length=2048"]

# danlu's own training path on one H100 (benchmarks/memory_gpu.py → benchmarks/results/memory_gpu_h100.json):
# (overrides, shape, max_memory_allocated GiB, max_memory_reserved + CUDA context GiB).
# Stated errors of the estimate: allocated within ±1.2%, total (with overhead) −11% … +7%.
R8 = ["lora.r=16", "train.batch_size=2", "data.max_seq_length=2048"]
R1 = ["train.batch_size=4", "data.max_seq_length=2048"]
MEASURED = [
    ([*R8, "train.gradient_checkpointing=true"], "llama3-8b", 23.40, 26.66),
    ([*R8, "train.gradient_checkpointing=true", "model.quantization=nf4"], "llama3-8b", 13.76, 16.62),
    ([*R8, "train.gradient_checkpointing=false"], "llama3-8b", 53.66, 56.27),
    ([*R8, "train.gradient_checkpointing=false", "model.quantization=nf4"], "llama3-8b", 44.02, 46.22),
    ([*R1, "train.method=full", "train.gradient_checkpointing=true"], "llama-1b", 29.21, 36.62),
    ([*R1, "lora.r=16", "train.gradient_checkpointing=false"], "llama-1b", 32.95, 36.45),
]

# ANCHORS.md (plain HF + PEFT, max_memory_allocated): (overrides, GiB, stated error of our allocated estimate).
# danlu's QLoRA keeps every unquantized weight in bf16 and so uses less than those HF runs.
ANCHORS = [
    (["train.gradient_checkpointing=true"], 23.4, -0.005),
    (["train.gradient_checkpointing=false"], 58.4, -0.083),
    (["train.gradient_checkpointing=true", "model.quantization=nf4"], 15.0, -0.091),
    (["train.gradient_checkpointing=false", "model.quantization=nf4"], 52.1, -0.158),
]


def cfg(*overrides: str):
    return load_config(None, list(overrides))


@pytest.mark.parametrize("overrides, shape, allocated, seen", MEASURED)
def test_estimate_matches_danlu_on_h100(overrides, shape, allocated, seen):
    plan = estimate(cfg(*overrides, "train.fast=off"), SHAPES[shape])  # measured before the fast path
    assert abs(plan.allocated / GiB / allocated - 1) <= 0.015
    assert -0.12 <= plan.total / GiB / seen - 1 <= 0.08


@pytest.mark.parametrize("overrides, measured, error", ANCHORS)
def test_estimate_against_anchors(overrides, measured, error):
    plan = estimate(cfg(*ANCHOR_RUN, *overrides, "train.fast=off"), L3)  # HF + PEFT: the plain loss
    assert abs(plan.allocated / GiB / measured - 1 - error) <= 0.01


# The same script with the whole fast path (train.fast=auto: chunked loss, compiled layers, layer inputs
# in CPU memory; benchmarks/results/fast_loss_h100.json, "auto"): peak max_memory_allocated in GiB.
FAST = [
    ([*R8, "train.gradient_checkpointing=true"], "auto", 17.2),
    ([*R8, "train.gradient_checkpointing=true", "model.quantization=nf4"], "auto", 7.56),
]


@pytest.mark.parametrize("overrides, fast, allocated", FAST)
def test_estimate_matches_the_fast_path_on_h100(overrides, fast, allocated):
    plan = estimate(cfg(*overrides, f"train.fast={fast}"), L3)
    assert abs(plan.allocated / GiB / allocated - 1) <= 0.015


def test_fast_measurements_file_agrees_with_the_table():
    import json
    from pathlib import Path

    runs = json.loads((Path(__file__).parent.parent / "benchmarks/results/fast_loss_h100.json").read_text())
    for (overrides, _, allocated), run in zip(FAST, runs["auto"], strict=True):
        assert sorted(run["overrides"]) == sorted(overrides)
        assert round(run["peak_allocated_gib"], 2) == allocated


def test_measurements_file_agrees_with_the_table():
    import json
    from pathlib import Path

    runs = json.loads((Path(__file__).parent.parent / "benchmarks/results/memory_gpu_h100.json").read_text())[
        "runs"
    ]
    by_overrides = {tuple(sorted(r["overrides"])): r for r in runs}
    for overrides, shape, allocated, seen in MEASURED:
        run = by_overrides[tuple(sorted(overrides))]
        assert run["shape"] == shape and round(run["peak_allocated_gib"], 2) == allocated
        assert round(run["peak_reserved_gib"] + run["outside_allocator_gib"], 2) == seen


# Out of sample: settings none of the constants above were fitted to, measured later on an H200
# (benchmarks/memory_gpu.py configurations g-k → benchmarks/results/memory_gpu_h200.json):
# (config, overrides, shape, max_memory_allocated GiB, max_memory_reserved + CUDA context GiB).
H200 = [
    ("h", ["lora.r=16", "train.batch_size=4", "data.max_seq_length=1024",
           "train.gradient_checkpointing=true", "train.fast=off"], "llama3-8b", 22.42, 26.66),
    ("j", ["lora.r=64", "train.batch_size=1", "data.max_seq_length=4096",
           "train.gradient_checkpointing=true", "model.quantization=nf4"], "llama3-8b", 9.43, 11.84),
    ("g", ["lora.r=64", "train.batch_size=1", "data.max_seq_length=4096",
           "train.gradient_checkpointing=true"], "qwen2.5-7b", 18.65, 21.03),
    ("i", ["train.method=full", "train.batch_size=2", "data.max_seq_length=2048",
           "train.gradient_checkpointing=true", "train.fast=off"], "qwen2.5-1.5b", 26.72, 33.85),
]  # fmt: skip
# Without checkpointing the planner counts each layer's activations as fitted on the plain path
# (configuration d); the compiled fast path keeps less of them, so this run is over-estimated by
# 23%: on the safe side, but not tight (not yet modelled).
H200_FAST_NO_CHECKPOINTING = (
    "k", ["lora.r=8", "train.batch_size=8", "data.max_seq_length=512", "train.gradient_checkpointing=false"],
    "llama-1b", 10.09, 11.23,
)  # fmt: skip


@pytest.mark.parametrize("name, overrides, shape, allocated, seen", H200)
def test_estimate_holds_out_of_sample_on_h200(name, overrides, shape, allocated, seen):
    """The stated accuracy on new data: allocated within ±6% (measured -5.0% ... +3.8%), the total
    with the CUDA context within -12% ... +8% (measured -11.8% ... -1.2%)."""
    plan = estimate(cfg(*overrides), SHAPES[shape])
    assert abs(plan.allocated / GiB / allocated - 1) <= 0.06
    assert -0.12 <= plan.total / GiB / seen - 1 <= 0.08


def test_fast_path_without_checkpointing_is_over_not_under_estimated():
    _, overrides, shape, allocated, _ = H200_FAST_NO_CHECKPOINTING
    plan = estimate(cfg(*overrides), SHAPES[shape])
    assert 1.0 <= plan.allocated / GiB / allocated <= 1.3


def test_h200_measurements_file_agrees_with_the_table():
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks/results/memory_gpu_h200.json"
    runs = {r["config"]: r for r in json.loads(path.read_text())["runs"]}
    for name, overrides, shape, allocated, seen in [*H200, H200_FAST_NO_CHECKPOINTING]:
        run = runs[name]
        assert run["overrides"] == overrides and run["shape"] == shape and "error" not in run
        assert round(run["peak_allocated_gib"], 2) == allocated
        assert round(run["peak_reserved_gib"] + run["outside_allocator_gib"], 2) == seen


def test_shape_counts_parameters_like_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (True, False):
        conf = LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(conf)
        assert Shape.from_config(conf).params() == sum(p.numel() for p in model.parameters())
        assert Shape.from_config(conf.to_dict()).params() == Shape.from_config(conf).params()


def test_lora_trainable_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for targets in (["all-linear"], ["q_proj", "v_proj"]):
        peft_targets = "all-linear" if targets == ["all-linear"] else targets
        model = get_peft_model(LlamaForCausalLM(conf), LoraConfig(r=4, target_modules=peft_targets))
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        c = cfg("lora.r=4", f"lora.target_modules={targets}")
        assert trainable_params(c, Shape.from_config(conf)) == n


def test_checkpointing_lowers_activations():
    on = estimate(cfg("train.gradient_checkpointing=true"), L3)
    off = estimate(cfg("train.gradient_checkpointing=false"), L3)
    assert on.activations < off.activations / 10
    assert on.total < off.total


def test_quantization_lowers_weights():
    none, int8, nf4 = (estimate(cfg(f"model.quantization={q}"), L3) for q in ("none", "int8", "nf4"))
    assert nf4.weights < int8.weights < none.weights
    dq = estimate(cfg("model.quantization=nf4", "model.double_quant=true"), L3)
    no_dq = estimate(cfg("model.quantization=nf4", "model.double_quant=false"), L3)
    assert dq.weights < no_dq.weights


def test_larger_batch_raises_activations_and_logits():
    for ckpt in ("true", "false"):
        small = estimate(
            cfg("train.batch_size=1", f"train.gradient_checkpointing={ckpt}", "train.fast=off"), L3
        )
        big = estimate(
            cfg("train.batch_size=4", f"train.gradient_checkpointing={ckpt}", "train.fast=off"), L3
        )
        assert big.activations > small.activations
        assert big.logits == 4 * small.logits
        assert big.weights == small.weights


def test_the_chunked_loss_caps_the_logits_term():
    from danlu.fast import CHUNK

    small = estimate(cfg("train.batch_size=1"), L3)
    big = estimate(cfg("train.batch_size=4"), L3)
    assert big.logits == small.logits  # 1 x 1024 and 4 x 1024 tokens: one chunk at a time either way
    assert big.logits == estimate(cfg("train.batch_size=4", "train.fast=off"), L3).logits * CHUNK // 4096
    short = ("train.batch_size=1", "data.max_seq_length=512")  # fewer tokens than a chunk: nothing to save
    assert estimate(cfg(*short), L3).logits == estimate(cfg(*short, "train.fast=off"), L3).logits


@pytest.mark.parametrize(
    "strategy, fast", [("ddp", True), ("fsdp", False), ("zero2", False), ("zero3", False)]
)
def test_the_fast_paths_savings_count_only_where_it_runs(strategy, fast):
    """DDP takes the fast path; FSDP2 and ZeRO run the plain loss and keep every layer's input."""
    run = ("train.batch_size=4", "train.gradient_checkpointing=true", f"train.strategy={strategy}")
    auto, off = estimate(cfg(*run), L3), estimate(cfg(*run, "train.fast=off"), L3)
    assert (auto.logits < off.logits) == fast and (auto.activations < off.activations) == fast
    assert (auto.total < off.total) == fast


def test_full_tuning_costs_more_than_lora():
    lora = estimate(cfg(), SHAPES["llama-1b"])
    full = estimate(cfg("train.method=full"), SHAPES["llama-1b"])
    assert full.trainable == full.params > 100 * lora.trainable
    assert full.optimizer > 8 * full.params - 1 and full.total > lora.total


def test_suggestions_make_a_too_big_run_fit_16gb():
    base = ["train.batch_size=4", "data.max_seq_length=2048", "lora.r=16"]
    shape = SHAPES["qwen2.5-7b"]
    budget = parse_gpu_mem("16GB")
    assert not fits(estimate(cfg(*base), shape), budget)
    lines = suggestions(cfg(*base), shape, budget)
    assert lines
    for line in lines:
        changes, claimed = line.split("→")
        fixed = estimate(cfg(*base, *changes.split()), shape)
        assert fits(fixed, budget), line
        assert abs(fixed.total / GiB - float(re.search(r"[\d.]+", claimed).group())) < 0.06
    assert lines[0].startswith("train.gradient_checkpointing=true")


def test_no_suggestions_when_it_fits():
    assert suggestions(cfg(), SHAPES["smollm2-135m"], parse_gpu_mem("80GB")) == []


@pytest.mark.parametrize(
    "text, gib", [("16GB", 16), ("16GiB", 16), ("24G", 24), ("80", 80), ("12.5 gb", 12.5), ("8192MB", 8)]
)
def test_parse_gpu_mem(text, gib):
    assert parse_gpu_mem(text) == int(gib * GiB)


@pytest.mark.parametrize("gpu_mem, verdict", [("16GB", "fits:"), ("8GB", "does not fit:")])
def test_cli_plan_with_a_shape(capsys, gpu_mem, verdict):
    rc = main(
        [
            "plan",
            "--shape",
            "qwen2.5-7b",
            "model.quantization=nf4",
            "train.batch_size=2",
            "data.max_seq_length=1024",
            "train.gradient_checkpointing=true",
            "--gpu-mem",
            gpu_mem,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    for row in ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "overhead", "total"):
        assert re.search(rf"^  {row}\s+[\d.]+ GiB", out, re.M), row
    assert re.search(r"^" + verdict, out, re.M)
    other = "does not fit:" if verdict == "fits:" else "fits:"
    assert not re.search(r"^" + other, out, re.M)


def test_cli_plan_suggests_when_too_big(capsys):
    rc = main(
        ["plan", "--shape", "llama3-8b", "train.batch_size=2", "data.max_seq_length=2048", "--gpu-mem", "24"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "does not fit" in out
    assert "train.gradient_checkpointing=true" in out.split("to fit")[1]


def test_cli_plan_reads_a_model_folder(capsys, tiny_model_dir):
    rc = main(["plan", f"model.path={tiny_model_dir}", "--gpu-mem", "8GB"])
    out = capsys.readouterr().out
    assert rc == 0 and re.search(r"^fits:", out, re.M) and "2 layers" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--shape", "qwen2.5-7b", "--gpu-mem", "16XB"], "--gpu-mem"),
        (["plan", "--shape", "qwen2.5-7b", "--gpu-mem", "-3"], "--gpu-mem"),
        (["plan", "--shape", "gpt-5", "--gpu-mem", "16GB"], "known shapes"),
        (["plan", "model.path=nobody-here/no-such-model-danlu", "--gpu-mem", "16GB"], "config.json"),
    ],
)
def test_cli_plan_bad_input_is_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
