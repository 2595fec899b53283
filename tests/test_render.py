"""Loss masks from the chat template: assistant turns and their stop token, nothing else."""

from __future__ import annotations

import copy

import pytest

from danlu.data.render import IGNORE, render, render_samples
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

    from danlu.data.encoding import _range_from_starts, _token_range

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


# ------------------------------------------------------------- templates that raise

# Mistral v0.1's rule, as its template states it: user and assistant alternate, from a user turn.
ALTERNATING = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_a_template_that_raises_is_a_record_error_naming_its_message_and_the_fix(tokenizer):
    from danlu.data.render import RecordError

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ALTERNATING
    with pytest.raises(RecordError) as info:
        render(strict, CHAT, 512, {tokenizer.eos_token_id})
    message = str(info.value)
    assert "Conversation roles must alternate user/assistant/user/assistant/..." in message
    assert "takes no system message: drop it from the record (and data.system)" in message
    assert "data.template" in message and "\n" not in message
    assert trained_text(strict, render(strict, CHAT[1:], 512, {tokenizer.eos_token_id})) == [
        "我是Danlu。<|im_end|>",
        "I am Danlu.<|im_end|>",
    ]
    # a record it refuses for another reason gets the general advice
    with pytest.raises(RecordError, match=r"alternate.*fix the record, or set data.template"):
        render(strict, [CHAT[2], CHAT[1], CHAT[2]], 512, {tokenizer.eos_token_id})


def test_a_template_that_is_not_jinja_is_a_user_error_not_a_bad_record(tokenizer):
    from danlu.data.render import RecordError

    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{% for m in messages %}{{ m['content'] }}"
    with pytest.raises(UserError, match="not valid Jinja") as info:
        render(broken, CHAT, 512, {tokenizer.eos_token_id})
    assert not isinstance(info.value, RecordError)  # never skipped record by record


def test_a_turn_whose_prompt_is_not_where_it_starts_is_refused(tokenizer):
    odd = copy.deepcopy(tokenizer)
    # the generation prompt says "bot:" but replies are written after "assistant:"
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}bot: {% endif %}"
    )
    with pytest.raises(UserError, match="cannot be located"):
        render(odd, CHAT, 512, {tokenizer.eos_token_id})


def test_a_generation_prompt_the_rendered_turn_lacks_trains_each_reply_after_that_prompt(tokenizer):
    """Gemma 4's way: the prompt for a reply holds an empty thought block that the reply, once
    rendered in the conversation, does not. Each reply is trained after the prompt the model saw."""
    closed = copy.deepcopy(tokenizer)
    closed.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% if not enable_thinking | default(false) %}{{ '<think></think>' }}{% endif %}{% endif %}"
    )
    stop = {tokenizer.eos_token_id}
    first, second = render_samples(closed, CHAT, 512, stop)
    for sample, before, reply in ((first, CHAT[:2], "我是Danlu。"), (second, CHAT[:4], "I am Danlu.")):
        prompt = closed.apply_chat_template(before, tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n<think></think>")
        assert closed.decode(sample.input_ids) == prompt + reply + "<|im_end|>\n"
        assert trained_text(closed, sample) == [reply + "<|im_end|>\n"]
    (everything,) = render_samples(closed, CHAT, 512, stop, "all")
    assert closed.decode(everything.input_ids) == closed.apply_chat_template(CHAT, tokenize=False)


# ------------------------------------------------------------------ slow tokenizers


def slow_tokenizer(merges: tuple[str, ...] = ()):
    """A Python (slow) tokenizer: one token per character, plus ``merges`` as single tokens,
    ChatML's markers as special tokens and the chatml template. It has no character offsets."""
    from transformers import PreTrainedTokenizer

    from danlu.data.templates import apply_template

    class Chars(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:\n"
            self.vocab = {t: i for i, t in enumerate(["<unk>", *merges, *chars])}
            self.ids = {i: t for t, i in self.vocab.items()}
            super().__init__(unk_token="<unk>", **kwargs)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return {**self.vocab, **self.added_tokens_encoder}

        def _tokenize(self, text):
            out, i = [], 0
            while i < len(text):
                piece = next((m for m in merges if text.startswith(m, i)), text[i])
                out.append(piece)
                i += len(piece)
            return out

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return self.ids.get(index, "<unk>")

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

        def save_vocabulary(self, save_directory, filename_prefix=None):
            return ()

    tok = Chars()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    apply_template(tok, "chatml")
    return tok


ENGLISH = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Danlu."},
    {"role": "user", "content": "And you?"},
    {"role": "assistant", "content": "Still Danlu."},
]


def test_slow_tokenizer_trains_exactly_the_replies(tokenizer):
    slow = slow_tokenizer(merges=("Danlu", "am ", "nt\n"))  # "nt\n" ends at a turn edge
    assert getattr(slow, "backend_tokenizer", None) is None
    sample = render(slow, ENGLISH, 512, {slow.eos_token_id})
    assert trained_text(slow, sample) == ["I am Danlu.<|im_end|>\n", "Still Danlu.<|im_end|>\n"]
    assert slow.decode(sample.input_ids) == slow.apply_chat_template(ENGLISH, tokenize=False)
    # the same spans a fast tokenizer gives for the same text
    fast = render(tokenizer, ENGLISH, 512, {tokenizer.eos_token_id})
    assert trained_text(slow, sample) == trained_text(tokenizer, fast)


def test_slow_tokenizer_with_a_token_across_a_turn_edge_refuses_the_record():
    from danlu.data.render import RecordError

    slow = slow_tokenizer(merges=("\nI",))  # "assistant\n" + "I am": one token across the edge
    with pytest.raises(RecordError, match=r"slow \(Python\) tokenizer.*fast tokenizer \(tokenizer.json\)"):
        render(slow, ENGLISH, 512, {slow.eos_token_id})
    assert render(slow, [ENGLISH[1], {"role": "assistant", "content": "Danlu."}], 512, {slow.eos_token_id})
