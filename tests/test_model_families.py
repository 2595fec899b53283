"""Families beyond Llama: right, or refused in one line — never silently wrong.

Tiny random models of other architectures around SmolLM2's real tokenizer: BLOOM, whose ALiBi
attention ignores position ids (packing would leak between samples); Granite, whose logits are
the head's output divided by a scale (the fast path's chunked loss would be wrong); a model whose
end-of-turn token lives only in ``generation_config.json`` (InternLM- and Gemma-style).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from danlu import model as mdl
from danlu.app.cli import main
from danlu.config import load_config
from danlu.errors import UserError
from danlu.train import train

RECORDS = [{"instruction": f"Say hello number {i}", "output": f"Hello number {i}!"} for i in range(8)]


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(
        vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return save(BloomForCausalLM(config), tokenizer, tmp_path_factory.mktemp("bloom"))


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    return save(GraniteForCausalLM(config), tokenizer, tmp_path_factory.mktemp("granite"))


def cfg(model_dir: Path, tmp_path: Path, *extra: str, name: str = "run"):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    return load_config(
        None,
        [
            f"model.path={model_dir}", f"data.path={data}", "data.cache=false", f"output.dir={tmp_path / name}",
            "output.tensorboard=false", "lora.r=4", "lora.alpha=8", "lora.dropout=0", "train.batch_size=4",
            "train.max_steps=3", "train.lr=1e-2", "train.scheduler=constant", *extra,
        ],
    )  # fmt: skip


def test_packing_leak_is_measured_on_the_model_itself(bloom_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    bloom = AutoModelForCausalLM.from_pretrained(bloom_dir).train()
    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    assert mdl.packing_leak(bloom) > 0.9  # ALiBi ignores the restarting positions: as one sequence
    assert mdl.packing_leak(llama) < 1e-3  # a block-diagonal mask from the position ids
    assert bloom.training and llama.training  # the check leaves the mode as it found it


def test_packing_is_refused_where_samples_would_see_each_other(bloom_dir, tmp_path):
    with pytest.raises(
        UserError, match=r"data.packing=true: BloomForCausalLM ignores the restarting positions"
    ):
        train(cfg(bloom_dir, tmp_path, "data.packing=true"), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    unpacked = train(cfg(bloom_dir, tmp_path, "data.packing=false", name="ok"), progress=False)
    assert len(unpacked.losses) == 3


def test_packing_still_trains_where_it_is_kept_apart(tiny_model_dir, tmp_path):
    result = train(cfg(tiny_model_dir, tmp_path, "data.packing=true"), progress=False)
    assert len(result.losses) >= 1


def test_a_model_whose_logits_are_scaled_gets_the_plain_loss(granite_dir, tmp_path, caplog):
    """Granite divides the head's output by logits_scaling: the chunked loss (head only) would train
    on the wrong logits. The check on the first samples sees it and the run takes the plain loss."""
    with caplog.at_level(logging.INFO, logger="danlu"):
        auto = train(cfg(granite_dir, tmp_path, "train.fast=auto", name="auto"), progress=False)
    assert "fast path: its loss differs from GraniteForCausalLM's own" in caplog.text
    plain = train(cfg(granite_dir, tmp_path, "train.fast=off", name="plain"), progress=False)
    assert auto.losses == pytest.approx(plain.losses, rel=1e-5)


def test_the_fast_path_stays_where_it_agrees(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="danlu"):
        train(cfg(tiny_model_dir, tmp_path, "train.fast=auto"), progress=False)
    assert "loss differs" not in caplog.text


@pytest.fixture
def eos_elsewhere_dir(tmp_path, tokenizer) -> Path:
    """A ChatML model whose tokenizer's EOS is <|endoftext|>: <|im_end|>, which ends its turns, is
    a stop token only in generation_config.json (as InternLM2 and Gemma ship theirs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.eos_token = "<|endoftext|>"
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    path = save(LlamaForCausalLM(config), tok, tmp_path / "model")
    return path


def im_end(path: Path) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<|im_end|>")


def test_stop_ids_come_from_the_generation_config_too(eos_elsewhere_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    check = ["data", "check", str(data), "--model", str(eos_elsewhere_dir)]
    # without a generation config naming <|im_end|>, the turns end with no stop token: refused
    assert main(check) == 2
    assert "does not end assistant turns with a stop token" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not end assistant turns with a stop token"):
        train(cfg(eos_elsewhere_dir, tmp_path, name="refused"), progress=False)

    gen = {"eos_token_id": [im_end(eos_elsewhere_dir), 0]}
    (eos_elsewhere_dir / "generation_config.json").write_text(json.dumps(gen))
    assert mdl.stop_token_ids(mdl.load_tokenizer(str(eos_elsewhere_dir)), ref=str(eos_elsewhere_dir)) >= {
        im_end(eos_elsewhere_dir)
    }
    assert main(check) == 0
    result = train(cfg(eos_elsewhere_dir, tmp_path, name="trained"), progress=False)
    assert len(result.losses) == 3
