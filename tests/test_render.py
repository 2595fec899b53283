"""Loss masks from the chat template: assistant turns and their stop token, nothing else."""

from __future__ import annotations

import copy

import pytest

from danlu.data.render import IGNORE, render
from danlu.errors import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是Danlu。"},
    {"role": "user", "content": "And in English?"},
    {"role": "assistant", "content": "I am Danlu."},
]


def trained_text(tokenizer, sample) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_only_assistant_turns_are_trained_with_their_stop_token(tokenizer):
    sample = render(tokenizer, CHAT, 512, {tokenizer.eos_token_id})
    assert trained_text(tokenizer, sample) == ["我是Danlu。<|im_end|>\n", "I am Danlu.<|im_end|>\n"]
    assert tokenizer.decode(sample.input_ids).startswith("<|im_start|>system\nBe brief.")
    assert not sample.truncated


def test_template_default_system_prompt_is_rendered_but_not_trained(tokenizer):
    sample = render(tokenizer, CHAT[1:3], 512, {tokenizer.eos_token_id})
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(sample.input_ids)
    assert trained_text(tokenizer, sample) == ["我是Danlu。<|im_end|>\n"]


def test_truncation_cuts_to_max_length(tokenizer):
    full = render(tokenizer, CHAT, 512, {tokenizer.eos_token_id})
    short = render(tokenizer, CHAT, 20, {tokenizer.eos_token_id})
    assert short.truncated and len(short.input_ids) == 20
    assert list(short.input_ids) == list(full.input_ids[:20]) and list(short.labels) == list(full.labels[:20])


def test_refuses_a_template_whose_turns_do_not_end_in_a_stop_token(tokenizer):
    broken = copy.deepcopy(tokenizer)
    # A template that closes turns with a blank line instead of <|im_end|>: generation would never stop.
    broken.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(UserError, match="never stop"):
        render(broken, CHAT, 512, {tokenizer.eos_token_id})


def test_refuses_a_tokenizer_without_template(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render(bare, CHAT, 512, {tokenizer.eos_token_id})


def test_token_ranges_from_the_span_edges_equal_those_from_every_offset(tokenizer):
    """The fast path (ask the encoding about two characters) must pick exactly the tokens that
    start inside each span, as reading all offsets does: byte-split Chinese characters and emoji,
    runs of spaces, special tokens, spans starting mid-token."""
    import random

    import numpy as np

    from danlu.data.render import _range_from_starts, _token_range

    rng = random.Random(0)
    pieces = [
        "hello",
        " world",
        "  ",
        "\n",
        "你好",
        "丹炉",
        "🙂",
        "<|im_end|>",
        "<|im_start|>",
        "ab",
        "é",
        "\t",
        "123",
    ]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    checked = 0
    for text, e in zip(texts, encodings, strict=True):
        starts = np.asarray([a for a, _ in e.offsets], np.int64)
        for _ in range(5):
            a = rng.randrange(len(text))
            b = rng.randint(a + 1, len(text))
            fast = _token_range(e, a, b)
            if fast is not None:
                assert fast == _range_from_starts(starts, a, b), (text, a, b)
                checked += 1
    assert checked > 1000


def test_batched_template_rendering_finds_the_same_spans(tokenizer):
    from danlu.data.render import assistant_spans, assistant_spans_many

    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    a = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    conversations = [
        [u("hi"), a("hello")],
        [{"role": "system", "content": "be brief"}, u("1+1?"), a("2"), u("and 2+2?"), a("4")],
        [u("你好"), a("你好！我是丹炉。"), u("再见"), a("再见")],
        [u("only one")] + [a("x")],
    ]
    assert assistant_spans_many(tokenizer, conversations) == [
        assistant_spans(tokenizer, c) for c in conversations
    ]
    assert assistant_spans_many(tokenizer, []) == []
