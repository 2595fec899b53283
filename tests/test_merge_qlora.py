"""danlu merge of a QLoRA adapter: the two bases it can go into, and how far each is from what
was trained (the 4-bit base + adapter), checked against models built here with plain
transformers, peft and bitsandbytes."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

from danlu.app.cli import main
from danlu.export import merge

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

CHAT = [{"role": "user", "content": "What is your name? 你叫什么名字？"}]


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir, tmp_path_factory):
    """A strong random adapter in OUTPUT/final, with the run config of a run that trained on nf4."""
    from server_helpers import make_adapter

    run = tmp_path_factory.mktemp("qlora-run")
    adapter = make_adapter(tiny_model_dir, run / "final", seed=3)
    config = {"model": {"path": str(tiny_model_dir), "quantization": "nf4", "double_quant": True}}
    (run / "danlu_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return adapter


def nf4_base(model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, dtype=torch.float32, device_map={"": "cpu"}
    )
    for m in model.modules():  # bitsandbytes' AVX512-BF16 CPU repack fails on layers this narrow
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits[0].float()


@pytest.fixture(scope="module")
def references(tiny_model_dir, qlora_adapter):
    """Logits on CHAT of: the fp32 base + adapter, the nf4 base + adapter (what was trained), and
    the fp32 base holding the nf4 weights dequantized + adapter."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)])
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    quantized = nf4_base(tiny_model_dir)
    twin = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    layers = dict(twin.named_modules())
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                layers[name].weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    out = {"ids": ids}
    for key, base in (("original", full), ("trained", quantized), ("dequantized", twin)):
        out[key] = logits(PeftModel.from_pretrained(base, str(qlora_adapter)).eval(), ids)
    return out


def merged_logits(folder, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), ids)


def test_qlora_merge_into_the_original_weights_reports_its_distance_from_what_was_trained(
    qlora_adapter, references, tmp_path, capsys
):
    out = tmp_path / "orig"
    assert main(["merge", "--adapter", str(qlora_adapter), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "merged into the original float32 weights (--base-precision original)" in said
    assert "vs what was trained (nf4 base + adapter): mean |Δlogit|" in said
    got = merged_logits(out, references["ids"])
    # the 16-bit base + adapter, merged: float rounding only (merged and unmerged matmuls add in
    # another order: up to 1.0e-4 seen on logits of size ~5), far below the nf4 gap checked next
    assert (got - references["original"]).abs().max() < 5e-4
    trained_gap = (got - references["trained"]).abs().mean().item()
    assert trained_gap > 0.01  # nf4 rounding really moved this model: the gap is there to measure
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "--base-precision original" in card and "vs what was trained" in card


def test_qlora_merge_measures_both_gaps_the_way_plain_libraries_do(qlora_adapter, references, tmp_path):
    """The numbers merge reports are the distances a user would compute by hand (on other prompts,
    so compared by size), and the dequantized merge is the model that was trained."""
    from danlu.app.common import base_of_adapter

    base = base_of_adapter(qlora_adapter)
    orig = merge(qlora_adapter, base, tmp_path / "o")
    deq = merge(qlora_adapter, base, tmp_path / "d", base_precision="dequantized")
    assert (orig.quantized, orig.base_precision, deq.base_precision) == ("nf4", "original", "dequantized")
    # original: equal to the fp32 base + adapter, far from what was trained
    assert orig.gaps["original"].mean < 1e-5 < orig.gaps["trained"].mean
    # dequantized: equal to what was trained (bitsandbytes' 4-bit matmul in fp32), far from the original
    assert deq.gaps["trained"].mean < orig.gaps["trained"].mean / 100
    assert deq.gaps["original"].mean > 100 * deq.gaps["trained"].mean
    assert deq.gaps["trained"].agree == 1.0
    # the two gaps are the same distance seen from either side
    assert deq.gaps["original"].mean == pytest.approx(orig.gaps["trained"].mean, rel=0.05)

    ids = references["ids"]
    got = merged_logits(tmp_path / "d", ids)
    assert (got - references["dequantized"]).abs().max() < 1e-3  # the dequantized weights + adapter
    assert (got - references["trained"]).abs().max() < 1e-3
    assert (got - merged_logits(tmp_path / "o", ids)).abs().mean() > 0.01


def test_dequantized_is_refused_for_an_adapter_not_trained_in_4_bit(tiny_model_dir, tmp_path, capsys):
    from server_helpers import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "run" / "final", seed=1)
    args = ["merge", "--adapter", str(adapter), "--model", str(tiny_model_dir), "--out", str(tmp_path / "m")]
    assert main([*args, "--base-precision", "dequantized"]) == 2
    err = capsys.readouterr().err
    assert "--base-precision dequantized" in err and "QLoRA adapters only" in err
    assert not (tmp_path / "m").exists()
    assert main(args) == 0
    assert "QLoRA adapter" not in capsys.readouterr().out  # nothing to compare for a plain LoRA adapter
