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


# ------------------------------------------------ records the chat template refuses


def strict_tokenizer(tokenizer):
    from test_render import ALTERNATING  # Mistral v0.1's rule: no system message

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ALTERNATING
    return strict


def with_system(rows: list[dict], every: int) -> list[dict]:
    return [{**r, "system": "Be brief."} if i % every == every - 1 else r for i, r in enumerate(rows)]


def test_template_refusal_names_the_record_and_the_fix(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", with_system(records(4), every=3))
    with pytest.raises(UserError) as info:
        build(cfg_for(path), strict_tokenizer(tokenizer), {tokenizer.eos_token_id})
    message = str(info.value)
    assert message.startswith(
        f"{path}:3: the chat template refuses this record (Conversation roles must alternate"
    )
    assert "drop it from the record (and data.system)" in message
    assert message.endswith("data.on_error=skip leaves such records out")


@pytest.mark.parametrize("procs", [1, 2])
def test_on_error_skip_leaves_refused_records_out_and_counts_them(tokenizer, tmp_path, procs):
    rows = with_system(records(2500), every=1000)  # lines 1000, 2000: one in each of two chunks
    path = write_jsonl(tmp_path / "d.jsonl", [*rows[:5], {"instruction": "no answer"}, *rows[5:]])
    cfg = cfg_for(path, "data.on_error=skip", f"data.num_proc={procs}")
    train, _, summary = build(cfg, strict_tokenizer(tokenizer), {tokenizer.eos_token_id})
    assert (summary.records, summary.samples, len(train)) == (2498, 2498, 2498)
    assert summary.skipped == 3
    assert summary.skipped_where == [f"{path}:6", f"{path}:1001", f"{path}:2001"]
    assert "3 bad records skipped" in summary.line()
    assert all("Be brief." not in tokenizer.decode(s.input_ids) for s in train)


def test_every_record_refused_is_one_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", with_system(records(3), every=1))
    with pytest.raises(UserError, match=f"all 3 records are bad under this chat template, e.g. {path}:1: "):
        build(cfg_for(path, "data.on_error=skip"), strict_tokenizer(tokenizer), {tokenizer.eos_token_id})


def test_eval_records_refused_are_counted_too(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records(5))
    held = write_jsonl(tmp_path / "e.jsonl", [*with_system(records(3), every=2), {"output": "x"}])
    cfg = cfg_for(path, f"data.eval_path={held}", "data.on_error=skip")
    train, evals, summary = build(cfg, strict_tokenizer(tokenizer), {tokenizer.eos_token_id})
    assert (len(train), len(evals), summary.records) == (5, 2, 5)
    assert summary.skipped_where == [f"{held}:4", f"{held}:2"]


def test_slow_tokenizer_record_across_an_edge_is_skipped_with_the_others_kept(tmp_path):
    from test_render import slow_tokenizer

    slow = slow_tokenizer(merges=("\nI",))  # a reply starting with "I" is one token across the edge
    rows = [
        {"instruction": f"Say {i}", "output": ("I say " if i == 1 else "Yes ") + str(i)} for i in range(3)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, summary = build(cfg_for(path, "data.on_error=skip"), slow, {slow.eos_token_id})
    assert (len(train), summary.skipped_where) == (2, [f"{path}:2"])
    assert [trained(slow, s) for s in train] == ["Yes 0<|im_end|>\n", "Yes 2<|im_end|>\n"]


# ------------------------------------------------------ turns rendered as written


def test_a_reasoning_template_trains_each_reply_as_a_sample_of_its_own(tokenizer, tmp_path):
    from danlu.data.dataset import tokenize, tokenize_records
    from test_templates import QWEN3_TOKENS, family

    tok = family(tokenizer, "qwen3", QWEN3_TOKENS)
    chat = {
        "messages": [*CHAT, {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [chat, {"messages": CHAT[:2]}])
    train, _, summary = build(cfg_for(path), tok, {tok.eos_token_id})
    assert (summary.records, summary.samples) == (2, 4)  # three replies, one of which is last
    assert sorted(trained(tok, s) for s in train) == sorted(
        f"<think>\n\n</think>\n\n{reply}<|im_end|>\n" for reply in ["Hello.", "Danlu.", "Yes.", "Hello."]
    )
    convs, _, _ = load_conversations(cfg_for(path))
    pairs = tokenize_records(convs, tok, cfg_for(path), {tok.eos_token_id})
    assert [len(samples) for _, samples in pairs] == [3, 1]
    joined = tokenize(convs, tok, cfg_for(path), {tok.eos_token_id})  # one per record, for danlu data
    assert len(joined) == 2 and len(joined[0].input_ids) == sum(len(s.input_ids) for s in pairs[0][1])
