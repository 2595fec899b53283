"""Every shape of data users bring: trained as meant, or refused with file, line and a reason.

Each test writes a small file of one shape and reads it through training's own path
(``load_conversations`` → ``tokenize_records``) with SmolLM2's real tokenizer, or through
``danlu data check / preview``; the trained tokens are read back from the labels.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl
from danlu.app.cli import main
from danlu.config import DataConfig, load_config
from danlu.data.dataset import build, load_conversations, tokenize_records
from danlu.data.formats import Record, detect_format, record_tools, to_messages
from danlu.data.kinds import is_kto, is_preference
from danlu.data.render import IGNORE, Sample
from danlu.data.sources import SkipReport, load_sources
from danlu.data.templates import apply_template
from danlu.errors import UserError


def U(text):
    return {"role": "user", "content": text}


def A(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def cfg_for(*paths: Path, **settings) -> DataConfig:
    return DataConfig(path=[str(p) for p in paths], cache=False, num_proc=1, **settings)


def stop(tok) -> set[int]:
    return {tok.convert_tokens_to_ids("<|im_end|>")}


def samples(tok, cfg: DataConfig) -> list[tuple[object, list[Sample]]]:
    conversations, _, skipped = load_conversations(cfg)
    return tokenize_records(conversations, tok, cfg, stop(tok), skipped)


def trained(tok, sample: Sample) -> list[str]:
    """The runs of trained tokens, decoded."""
    labels = np.asarray(sample.labels) != IGNORE
    runs, start = [], None
    for i, on in enumerate([*labels, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(tok.decode(list(sample.input_ids[start:i])))
            start = None
    return runs


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ content as parts


def test_content_parts_are_joined_text(tmp_path, tokenizer):
    parts = [{"type": "text", "text": "Good "}, {"type": "text", "value": "morning"}, "!"]
    path = write_jsonl(
        tmp_path / "parts.jsonl",
        [
            {"messages": [{"role": "user", "content": parts}, A([{"type": "text", "text": "Hi there."}])]},
            {"messages": [U("Good morning!"), A("Hi there.")]},
        ],
    )
    (first, s1), (second, s2) = samples(tokenizer, cfg_for(path))
    assert first[1] == second[1] == [U("Good morning!"), A("Hi there.")]
    assert trained(tokenizer, s1[0]) == ["Hi there.<|im_end|>\n"]
    assert list(s1[0].input_ids) == list(s2[0].input_ids)


@pytest.mark.parametrize(
    "record, said",
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    A("A cat."),
                ]
            },
            "messages[0].content[0] is a part of type 'image_url', not text",
        ),
        ({"messages": [U("What is this?"), A("A cat.")], "images": ["cat.png"]}, "the record has 'images'"),
        ({"messages": [U("<image>What is this?"), A("A cat.")]}, "holds a <image> marker"),
        (
            {
                "conversations": [
                    {"from": "human", "value": "<video>Describe"},
                    {"from": "gpt", "value": "Rain."},
                ]
            },
            "holds a <video> marker",
        ),
        ({"instruction": "Transcribe", "output": "Hello", "audios": ["a.wav"]}, "the record has 'audios'"),
    ],
)
def test_media_is_refused_with_file_and_line(tmp_path, record, said):
    good = {  # a good record of the same format first: a file's format comes from its first record
        "conversations": {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
        },
        "instruction": {"instruction": "Hi", "output": "Hello."},
    }
    first = next((v for k, v in good.items() if k in record), {"messages": [U("Hi"), A("Hello.")]})
    path = write_jsonl(tmp_path / "media.jsonl", [first, record])
    message = user_error(load_sources, cfg_for(path))
    assert message.startswith(f"{path}:2: ") and said in message and "does not train on" in message
    pairs, skipped = load_sources(cfg_for(path, on_error="skip"))  # skipped, never trained as text
    assert len(pairs) == 1 and skipped.items[0][0] == f"{path}:2"


# --------------------------------------------------------------------- text corpora


def test_txt_file_is_one_document_or_blocks(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First paragraph,\nstill first.\n\n\nSecond one.\n  \nThird.\n", encoding="utf-8")
    ((record, messages),) = load_sources(cfg_for(path))[0]
    assert record.format == "text" and messages == [
        {"role": "text", "content": "First paragraph,\nstill first.\n\n\nSecond one.\n  \nThird."}
    ]
    pairs, _ = load_sources(cfg_for(path, text_split="blank_line"))
    assert [(r.line, m[0]["content"]) for r, m in pairs] == [
        (1, "First paragraph,\nstill first."),
        (5, "Second one."),
        (7, "Third."),
    ]


def test_text_next_to_data_files_is_left_out_of_a_folder(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    (tmp_path / "README.md").write_text("# about this data\n", encoding="utf-8")
    pairs, _ = load_sources(cfg_for(tmp_path))
    assert [r.format for r, _ in pairs] == ["alpaca"]
    assert "left out 1 .txt/.md file(s)" in caplog.text and "README.md" in caplog.text
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.md", "b.txt"):
        (corpus / name).write_text(f"text of {name}\n", encoding="utf-8")
    assert [m[0]["content"] for _, m in load_sources(cfg_for(corpus))[0]] == ["text of a.md", "text of b.txt"]


def long_document(tok, tmp_path: Path) -> tuple[Path, int]:
    text = " ".join(f"word{i}" for i in range(300))
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    n = len(tok(text, add_special_tokens=True)["input_ids"]) + 1  # + EOS
    return path, n


def test_long_documents_become_windows_every_token_trained_once(tmp_path, tokenizer):
    path, n = long_document(tokenizer, tmp_path)
    ((_, windows),) = samples(tokenizer, cfg_for(path, max_seq_length=64))
    assert n > 3 * 64 and len(windows) == -(-n // 64)
    assert all(len(w.input_ids) == 64 for w in windows[:-1]) and not any(w.truncated for w in windows)
    ids = np.concatenate([w.input_ids for w in windows])
    assert sum(w.trained_tokens for w in windows) == len(ids) == n
    assert ids[-1] == tokenizer.eos_token_id

    ((_, overlapped),) = samples(tokenizer, cfg_for(path, max_seq_length=64, window_overlap=16))
    assert sum(w.trained_tokens for w in overlapped) == n  # the overlap is context, not trained twice
    second = overlapped[1]
    assert list(second.input_ids[:16]) == list(overlapped[0].input_ids[-16:])
    assert (np.asarray(second.labels[:16]) == IGNORE).all() and (
        np.asarray(second.labels[16:]) != IGNORE
    ).all()

    ((_, cut),) = samples(tokenizer, cfg_for(path, max_seq_length=64, long_text="truncate"))
    assert len(cut) == 1 and cut[0].truncated and len(cut[0].input_ids) == 64


def test_build_summary_and_check_report_windows(capsys, tmp_path, tokenizer, default_model_dir):
    path, n = long_document(tokenizer, tmp_path)
    train, _, summary = build(cfg_for(path, max_seq_length=64), tokenizer, stop(tokenizer))
    windows = -(-n // 64)
    assert (summary.split_documents, summary.windows, summary.truncated) == (1, windows, 0)
    assert f"1 long documents split into {windows} windows" in summary.line()
    code, out, err = run(
        capsys, "data", "check", path, "--model", default_model_dir, "data.max_seq_length=64"
    )
    assert code == 0, err
    assert f"windows:    1 document over 64 tokens → {windows} windows (overlap 0)" in out
    assert re.search(rf"trained:\s+{n} tokens", out)
    assert re.search(rf"verdict:\s+text documents: 1 record trains {n} tokens \(text: every token\)", out)


# ------------------------------------------------------------------------ tool calling

# A ChatML template with tools in the system turn and calls as <tool_call> JSON (written for
# these tests in the manner of Qwen2.5's; SmolLM2's own template has no place for tools).
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:\\n' }}{%- for t in tools %}{{- t | tojson + '\\n' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + m.content }}"
    "{%- for c in m.tool_calls or [] %}{{- '<tool_call>' + {'name': c.function.name, 'arguments': "
    "c.function.arguments} | tojson + '</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>' + m.content + "
    "'</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SCHEMA = {"name": "now", "description": "the time", "parameters": {"type": "object"}}
SHAREGPT_TOOLS = {
    "conversations": [
        {"from": "human", "value": "Time in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "now", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"time": "9:00"}'},
        {"from": "gpt", "value": "It is 9:00."},
    ],
    "tools": json.dumps([SCHEMA]),  # ShareGPT exports hold tools as JSON text
}


def test_sharegpt_tools_and_function_calls_read_as_the_template_takes_them():
    record = Record(SHAREGPT_TOOLS, "t.jsonl", 1, format="sharegpt")
    assert detect_format(record) == "sharegpt"
    assert record_tools(record) == [{"type": "function", "function": SCHEMA}]
    call = {"type": "function", "function": {"name": "now", "arguments": {"city": "Paris"}}}
    assert to_messages(record, "sharegpt") == [
        U("Time in Paris?"),
        A("", tool_calls=[call]),
        {"role": "tool", "content": '{"time": "9:00"}'},
        A("It is 9:00."),
    ]
    bad = {
        **SHAREGPT_TOOLS,
        "conversations": [SHAREGPT_TOOLS["conversations"][0], {"from": "function_call", "value": "now()"}],
    }
    message = user_error(to_messages, Record(bad, "t.jsonl", 3), "sharegpt")
    assert message.startswith("t.jsonl:3: conversations[1].value must be JSON text")


def test_tool_calls_trained_tool_results_not(tmp_path, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    path = write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT_TOOLS])
    ((_, (sample,)),) = samples(tok, cfg_for(path))
    text = tok.decode(list(sample.input_ids))
    assert '"name": "now", "description": "the time"' in text  # the tools reach the template
    assert trained(tok, sample) == [
        '<tool_call>{"name": "now", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n',
        "It is 9:00.<|im_end|>\n",
    ]
    assert '<tool_response>{"time": "9:00"}</tool_response>' in text


def test_template_without_tools_is_a_clear_refusal(tmp_path, tokenizer):
    plain = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = write_jsonl(tmp_path / "tools.jsonl", [plain, SHAREGPT_TOOLS])
    conversations, _, _ = load_conversations(cfg_for(path))
    message = user_error(tokenize_records, conversations, tokenizer, cfg_for(path), stop(tokenizer))
    assert message.startswith(f"{path}:2: the record defines tools but the chat template has no place")
    skipped = SkipReport()
    kept = tokenize_records(
        conversations, tokenizer, cfg_for(path, on_error="skip"), stop(tokenizer), skipped
    )
    assert len(kept) == 1 and skipped.items[0][0] == f"{path}:2"
    calls_only = {"messages": [U("hi"), A("", tool_calls=[{"function": {"name": "now", "arguments": "{}"}}])]}
    path = write_jsonl(tmp_path / "calls.jsonl", [calls_only])
    conversations, _, _ = load_conversations(cfg_for(path))
    message = user_error(tokenize_records, conversations, tokenizer, cfg_for(path), stop(tokenizer))
    assert "the record has tool calls but the chat template has no place for them" in message


def test_preview_shows_tools_and_the_trained_call(capsys, tmp_path, default_model_dir):
    jinja = tmp_path / "tools.jinja"
    jinja.write_text(TOOL_TEMPLATE, encoding="utf-8")
    path = write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT_TOOLS])
    code, out, err = run(
        capsys, "data", "preview", path, "--model", default_model_dir, "--template", jinja, "--plain"
    )
    assert code == 0, err
    assert f"── {path}:1 (sharegpt; tools: now):" in out
    assert '⟦<tool_call>{"name": "now", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n⟧' in out
    assert "⟦<tool_response>" not in out and "<tool_response>" in out


# ---------------------------------------------------------------- not SFT data

PAIR = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
PAIR_CHAT = {
    "conversations": [{"from": "human", "value": "Hi"}],
    "chosen": {"from": "gpt", "value": "Hello!"},
    "rejected": {"from": "gpt", "value": "No."},
}
KTO = {"messages": [U("Hi"), A("Go away.")], "label": False}
KTO_COMPLETION = {"prompt": "Hi", "completion": "Hello!", "label": True}


@pytest.mark.parametrize(
    "record, fmt", [(PAIR, "preference"), (PAIR_CHAT, "preference"), (KTO, "kto"), (KTO_COMPLETION, "kto")]
)
def test_preference_and_kto_are_detected(record, fmt):
    assert detect_format(Record(record, "d.jsonl", 1)) == fmt
    assert is_preference(record) == (fmt == "preference") and is_kto(record) == (fmt == "kto")


@pytest.mark.parametrize(
    "records, said",
    [
        (
            [PAIR_CHAT, PAIR_CHAT],
            "2 preference records; this is preference data (chosen/rejected pairs), not SFT data: train it with train.objective: dpo, orpo or simpo",
        ),
        (
            [KTO],
            "1 kto record; this is KTO data (replies labelled desirable or not), not SFT data: SFT would train the bad replies too; train it with train.objective: kto",
        ),
    ],
)
def test_sft_refuses_preference_files_saying_what_trains_them(tmp_path, records, said):
    path = write_jsonl(tmp_path / "p.jsonl", records)
    assert user_error(load_sources, cfg_for(path)) == f"{path}: {said}"
    assert (
        user_error(load_sources, cfg_for(path, on_error="skip")) == f"{path}: {said}"
    )  # a whole file, not bad records
    # a format named by hand does not make KTO data SFT data
    forced = user_error(load_sources, cfg_for(path, format="messages", on_error="skip"))
    assert said in forced


def test_a_topic_label_is_not_kto():
    topic = {"messages": [U("Hi"), A("Hello.")], "label": "greeting"}
    assert not is_kto(topic) and detect_format(Record(topic, "d.jsonl", 1)) == "messages"
    assert is_kto({**topic, "label": 1}) and not is_kto({**topic, "label": 0.5})


def test_a_kto_record_inside_a_chat_file_is_refused_not_trained(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": [U("Hi"), A("Hello.")]}, KTO])
    message = user_error(load_sources, cfg_for(path))
    assert message.startswith(f"{path}:2: this is KTO data") and "train.objective: kto" in message


def test_check_verdict_refuses_preference_file_and_reads_the_rest(capsys, tmp_path, default_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [U("Hi"), A("Hello.")]}])
    code, out, err = run(capsys, "data", "check", pairs, chat, "--model", default_model_dir)
    assert code == 2 and "train.objective: dpo, orpo or simpo" in err
    assert re.search(
        rf"{pairs}\n  verdict:    refused, nothing trains: 1 preference record; this is preference data", out
    )
    assert re.search(
        rf"{chat}\n  verdict:    chats \(messages\): 1 record trains \d+ tokens \(assistant replies\)", out
    )


def test_check_and_preview_read_preference_files_as_the_objective_does(capsys, tmp_path, default_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, {**PAIR, "prompt": "Hello?"}])
    code, out, err = run(capsys, "data", "check", pairs, "--model", default_model_dir, "--objective", "dpo")
    assert code == 0, err
    assert re.search(
        r"verdict:    preference pairs for train.objective=dpo: 2 pairs records → 2 samples", out
    )
    code, out, err = run(
        capsys, "data", "preview", pairs, "--model", default_model_dir, "--objective", "dpo", "-n", "1"
    )
    assert code == 0, err
    assert "[[Hello!<|im_end|>\n]]" in out and "[[Go away.<|im_end|>\n]]" in out


# ------------------------------------------------------------------- loss weights


@pytest.mark.parametrize(
    "key, off, on", [("loss_weight", 0, 1), ("weight", 0.0, 1.0), ("train", False, True)]
)
def test_message_weights_decide_which_replies_train(tmp_path, tokenizer, key, off, on):
    chat = {
        "messages": [U("Hi"), A("Bad answer.", **{key: off}), U("Again?"), A("Good answer.", **{key: on})]
    }
    path = write_jsonl(tmp_path / "w.jsonl", [chat])
    ((_, (sample,)),) = samples(tokenizer, cfg_for(path))
    assert trained(tokenizer, sample) == ["Good answer.<|im_end|>\n"]
    ((_, (whole,)),) = samples(tokenizer, cfg_for(path, loss_on="all"))
    assert "Bad answer." in "".join(trained(tokenizer, whole))  # all means every token


def test_sharegpt_turn_weights_and_bad_weights(tmp_path, tokenizer):
    turns = [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Skip me.", "weight": 0},
        {"from": "human", "value": "Again?"},
        {"from": "gpt", "value": "Train me.", "weight": 1},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])
    ((_, (sample,)),) = samples(tokenizer, cfg_for(path))
    assert trained(tokenizer, sample) == ["Train me.<|im_end|>\n"]
    half = write_jsonl(tmp_path / "half.jsonl", [{"messages": [U("Hi"), A("x", loss_weight=0.5)]}])
    assert "messages[1].loss_weight must be 0 or 1" in user_error(load_sources, cfg_for(half))
    none = write_jsonl(tmp_path / "none.jsonl", [{"messages": [U("Hi"), A("x", weight=0)]}])
    assert f"{none}:1: every assistant reply has loss weight 0" in user_error(load_sources, cfg_for(none))


# ---------------------------------------------------------------------- reasoning

THINKING = {
    "messages": [
        U("2+2?"),
        A("4", reasoning_content="Two and two."),
        U("3+3?"),
        A("<think>Three and three.</think>6"),
    ]
}


def qwen3(tokenizer):
    tok = copy.deepcopy(tokenizer)
    apply_template(tok, "qwen3")
    return tok


def test_reasoning_rendered_as_the_template_does(tmp_path, tokenizer):
    tok = qwen3(tokenizer)
    path = write_jsonl(tmp_path / "r.jsonl", [THINKING])
    ((_, found),) = samples(tok, cfg_for(path))
    runs = [run for s in found for run in trained(tok, s)]
    # Qwen3 keeps reasoning after the last user message only: the first reply trains as its own sample
    assert sorted(runs) == sorted(
        [
            "<think>\nThree and three.\n</think>\n\n6<|im_end|>\n",
            "<think>\nTwo and two.\n</think>\n\n4<|im_end|>\n",
        ]
    )
    for s in found:  # the stop check holds: each trained run ends with <|im_end|>
        assert stop(tok) <= set(np.asarray(s.labels)[np.asarray(s.labels) != IGNORE].tolist())


def test_reasoning_stripped_and_enable_thinking_false(tmp_path, tokenizer):
    tok = qwen3(tokenizer)
    path = write_jsonl(tmp_path / "r.jsonl", [THINKING])
    cfg = cfg_for(path, reasoning="strip", template_kwargs={"enable_thinking": False})
    ((_, found),) = samples(tok, cfg)
    assert sorted(run for s in found for run in trained(tok, s)) == ["4<|im_end|>\n", "6<|im_end|>\n"]
    for s in found:  # the empty think block is the prompt's (enable_thinking=false), not trained
        text = tok.decode(list(s.input_ids))
        assert text.endswith("<think>\n\n</think>\n\n" + trained(tok, s)[-1])
        assert "Two and two" not in text and "Three and three" not in text


def test_reasoning_goes_into_content_for_templates_without_it(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "r.jsonl", [{"messages": [U("2+2?"), A("4", reasoning_content="Two and two.")]}]
    )
    ((_, (sample,)),) = samples(tokenizer, cfg_for(path))  # SmolLM2's template never reads reasoning_content
    assert trained(tokenizer, sample) == ["<think>\nTwo and two.\n</think>\n\n4<|im_end|>\n"]
    ((_, (sample,)),) = samples(tokenizer, cfg_for(path, reasoning="strip"))
    assert trained(tokenizer, sample) == ["4<|im_end|>\n"]


def test_template_kwargs_from_the_command_line_keep_their_type():
    cfg = load_config(None, ["data.template_kwargs.enable_thinking=false", "data.template_kwargs.n=2"]).data
    assert cfg.template_kwargs == {"enable_thinking": False, "n": 2}
    assert "data.window_overlap" in user_error(load_config, None, ["data.window_overlap=1024"])


# ------------------------------------------------------------------- the verdict


def test_check_verdict_per_file_names_what_is_refused(capsys, tmp_path, default_model_dir):
    chats = write_jsonl(
        tmp_path / "chats.jsonl",
        [{"messages": [U("Hi"), A("Hello.")]}, {"messages": [U("Look"), A("A cat.")], "images": ["c.png"]}],
    )
    code, out, err = run(capsys, "data", "check", chats, "--model", default_model_dir)
    assert code == 2 and f"{chats}:2: the record has 'images'" in err  # training would stop there
    verdict = re.search(r"verdict:\s+(.*)", out).group(1)
    assert verdict.startswith("chats (messages): 1 record trains ")
    assert f"1 refused, e.g. {chats}:2: the record has 'images'" in verdict
    assert verdict.endswith("training stops at the first (data.on_error=raise)")
    code, out, _ = run(capsys, "data", "check", chats, "--model", default_model_dir, "data.on_error=skip")
    assert code == 0 and re.search(r"verdict:.*1 refused.*; skipped in training", out)
