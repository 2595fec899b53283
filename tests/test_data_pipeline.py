"""Templates, loss modes, raw formats, shaping, eval split, parallel tokenizing and the cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import write_jsonl
from danlu.config import load_config
from danlu.data.dataset import build, load_conversations
from danlu.data.render import IGNORE, render
from danlu.data.templates import TEMPLATES, apply_template
from danlu.errors import UserError

CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name?"},
    {"role": "assistant", "content": "Danlu."},
]


def trained(tokenizer, sample) -> str:
    ids = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE]
    return tokenizer.decode(ids)


def test_loss_on_modes(tokenizer):
    stop = {tokenizer.eos_token_id}
    every = render(tokenizer, CHAT, 512, stop, "assistant")
    last = render(tokenizer, CHAT, 512, stop, "last_assistant")
    everything = render(tokenizer, CHAT, 512, stop, "all")
    assert trained(tokenizer, every) == "Hello.<|im_end|>\nDanlu.<|im_end|>\n"
    assert trained(tokenizer, last) == "Danlu.<|im_end|>\n"
    assert list(everything.labels) == list(everything.input_ids)


def test_text_and_completion_records_skip_the_template(tokenizer):
    text = render(tokenizer, [{"role": "text", "content": "### Human: hi ### Assistant: yo"}], 512, set())
    assert list(text.labels) == list(text.input_ids) and text.input_ids[-1] == tokenizer.eos_token_id
    assert "<|im_start|>" not in tokenizer.decode(text.input_ids)
    pc = render(
        tokenizer, [{"role": "prompt", "content": "2+2="}, {"role": "completion", "content": "4"}], 512, set()
    )
    assert trained(tokenizer, pc) == "4<|im_end|>"
    assert tokenizer.decode(pc.input_ids).startswith("2+2=")


@pytest.mark.parametrize("name", ["alpaca", "vicuna", "chatml", "qwen", "llama2", "mistral"])
def test_named_templates_render_and_teach_the_stop_token(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    apply_template(tok, name)
    sample = render(tok, CHAT, 512, {tok.eos_token_id})
    text = trained(tok, sample)
    assert "Hello." in text and "Danlu." in text and "Hi" not in text
    assert text.count(tok.eos_token) == 2
    assert tok.chat_template == TEMPLATES[name].jinja


def test_template_whose_stop_token_the_tokenizer_lacks_is_refused(tokenizer):
    with pytest.raises(UserError, match="<\\|eot_id\\|>"):
        apply_template(copy.deepcopy(tokenizer), "llama3")
    with pytest.raises(UserError, match="not a known template"):
        apply_template(copy.deepcopy(tokenizer), "nosuch")


def test_jinja_file_template(tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATES["vicuna"].jinja)
    tok = copy.deepcopy(tokenizer)
    apply_template(tok, str(path))
    assert "ASSISTANT: Danlu." in tok.apply_chat_template(CHAT, tokenize=False)


def records(n: int) -> list[dict]:
    return [{"instruction": f"Say {i}", "input": "", "output": f"I say {i}, said Bob."} for i in range(n)]


def cfg_for(path, *extra):
    return load_config(None, [f"data.path={path}", "data.cache=false", *extra]).data


def test_sample_dedup_and_replace(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records(30) + records(10))
    convs, _, _ = load_conversations(cfg_for(path, "data.dedup=true"))
    assert len(convs) == 30
    a, _, _ = load_conversations(cfg_for(path, "data.sample=7", "data.seed=3"))
    b, _, _ = load_conversations(cfg_for(path, "data.sample=7", "data.seed=3"))
    c, _, _ = load_conversations(cfg_for(path, "data.sample=7", "data.seed=4"))
    assert len(a) == 7 and [m for _, m in a] == [m for _, m in b] and [m for _, m in a] != [m for _, m in c]
    replaced, _, _ = load_conversations(cfg_for(path, "data.replace.Bob=Ada"))
    assert all("Ada" in m[-1]["content"] and "Bob" not in m[-1]["content"] for _, m in replaced)


def test_eval_split_and_eval_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records(20))
    train, evals, summary = build(cfg_for(path, "data.eval_ratio=0.25"), tokenizer, {tokenizer.eos_token_id})
    assert (len(train), len(evals), summary.eval_samples) == (15, 5, 5)
    held = write_jsonl(tmp_path / "e.jsonl", records(3))
    train, evals, _ = build(cfg_for(path, f"data.eval_path={held}"), tokenizer, {tokenizer.eos_token_id})
    assert (len(train), len(evals)) == (20, 3)


def test_parallel_tokenizing_equals_serial(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records(2500))
    serial, _, _ = build(cfg_for(path, "data.num_proc=1"), tokenizer, {tokenizer.eos_token_id})
    parallel, _, _ = build(cfg_for(path, "data.num_proc=2"), tokenizer, {tokenizer.eos_token_id})
    assert len(serial) == len(parallel) == 2500
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)


def test_cache_reuses_and_invalidates(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_HOME", str(tmp_path / "home"))
    path = write_jsonl(tmp_path / "d.jsonl", records(12))
    cfg = load_config(None, [f"data.path={path}", "data.packing=true", "data.max_seq_length=64"]).data
    stop = {tokenizer.eos_token_id}
    first, _, s1 = build(cfg, tokenizer, stop)
    second, _, s2 = build(cfg, tokenizer, stop)
    assert not s1.cached and s2.cached and s2.packed_rows == s1.packed_rows
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.position_ids, b.position_ids)
    write_jsonl(path, records(13))  # new content → new key
    assert not build(cfg, tokenizer, stop)[2].cached
    cfg.max_seq_length = 128  # new setting → new key
    assert not build(cfg, tokenizer, stop)[2].cached
    assert len(list((tmp_path / "home" / "data").iterdir())) == 3
