"""Preference data (the shapes users bring, rendered as SFT renders them, truncation) and preference
runs through the recipe (rewards logged every step, the reference, exact resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from danlu.config import Config, load_config
from danlu.config.schema import DataConfig
from danlu.data.formats import Record
from danlu.data.preference import Labelled, Pair, build, encode_reply, fit, parse, preview, preview_text
from danlu.data.render import IGNORE, render
from danlu.errors import UserError
from danlu.model import stop_token_ids

USER = {"role": "user", "content": "Who are you?"}
SHORT, LONG = "I am Danlu.", "Well, that is a long story, and I am not sure where to begin."


def rec(data: dict, line: int = 3) -> Record:
    return Record(data, "prefs.jsonl", line)


@pytest.mark.parametrize(
    "data",
    [
        {"prompt": "Who are you?", "chosen": SHORT, "rejected": LONG},
        {
            "prompt": [USER],
            "chosen": [{"role": "assistant", "content": SHORT}],
            "rejected": [{"role": "assistant", "content": LONG}],
        },
        {"messages": [USER], "chosen": {"role": "assistant", "content": SHORT}, "rejected": LONG},
        {
            "conversations": [{"from": "human", "value": "Who are you?"}],
            "chosen": {"from": "gpt", "value": SHORT},
            "rejected": {"from": "gpt", "value": LONG},
        },
    ],
    ids=["strings", "trl-conversational", "openai", "sharegpt"],
)
def test_every_pair_shape_reads_as_the_same_prompt_and_replies(data):
    assert parse(rec(data)) == ("pairs", [USER], [SHORT, LONG], None)


@pytest.mark.parametrize(
    "data",
    [
        {"messages": [USER, {"role": "assistant", "content": SHORT}], "label": True},
        {"prompt": "Who are you?", "completion": SHORT, "label": True},
        {
            "conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": SHORT}],
            "label": 1,
        },
    ],
)
def test_kto_shapes(data):
    assert parse(rec(data)) == ("kto", [USER], [SHORT], True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"prompt": "Q", "chosen": "", "rejected": "b"},
            "prefs.jsonl:3: field 'chosen' must be a non-empty reply",
        ),
        ({"chosen": "a", "rejected": "b"}, "prefs.jsonl:3: a pair needs its prompt"),
        (
            {"prompt": "Q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
            "must be an assistant reply",
        ),
        (
            {"messages": [USER, {"role": "assistant", "content": "a"}], "label": "yes"},
            "field 'label' must be true or false",
        ),
        ({"messages": [USER], "label": True}, "must end with the assistant reply it labels"),
    ],
)
def test_mistakes_name_file_line_and_field(data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse(rec(data))


def test_a_reply_renders_exactly_as_sft_trains_it(tokenizer):
    stops = stop_token_ids(tokenizer)
    prompt, reply = encode_reply(tokenizer, [USER], SHORT, stops)
    sft = render(tokenizer, [USER, {"role": "assistant", "content": SHORT}], 1024, stops)
    trained = np.asarray(sft.labels) != IGNORE
    first = int(np.argmax(trained))
    assert list(prompt) == list(sft.input_ids[:first])
    assert list(reply) == list(np.asarray(sft.labels)[trained])
    assert any(int(t) in stops for t in reply)  # the stop token is part of what is learned


def test_truncation_keeps_the_prompts_end_and_the_replies_starts():
    prompt, a, b = np.arange(10), np.arange(100, 108), np.arange(200, 203)
    kept, (ka, kb), lost = fit(prompt, [a, b], 12)
    assert list(kept) == list(range(4, 10)) and list(ka) == list(range(100, 106)) and list(kb) == list(b)
    assert lost
    assert fit(prompt, [b], 13)[2] is False


def write_pairs(tmp_path, n=8):
    records = [{"prompt": f"Who are you, number {i}?", "chosen": SHORT, "rejected": LONG} for i in range(n)]
    return write_jsonl(tmp_path / "prefs.jsonl", records)


def test_build_counts_pairs_that_lost_a_reply_and_refuses_the_wrong_kind(tokenizer, tmp_path):
    path = write_pairs(tmp_path)
    stops = stop_token_ids(tokenizer)
    train, _, summary = build(DataConfig(path=[str(path)], max_seq_length=30), tokenizer, stops, "dpo")
    assert all(isinstance(p, Pair) for p in train) and summary.format == "pairs"
    # prompt (38 tokens with the default system prompt) and the long reply (19) do not fit in 30
    assert summary.truncated == len(train) == 8
    assert all(len(p.prompt) + len(p.rejected) <= 30 for p in train)
    assert tokenizer.decode(train[0].prompt).endswith("<|im_start|>assistant\n")  # the prompt's end is kept
    assert SHORT in tokenizer.decode(train[0].chosen)  # the short reply is whole
    untouched, _, summary = build(DataConfig(path=[str(path)], max_seq_length=40), tokenizer, stops, "dpo")
    assert summary.truncated == 0  # the prompt gives way (keeping its end), no reply is cut
    with pytest.raises(
        UserError, match=r"prefs.jsonl:1: a pairs record, which train.objective=kto does not read"
    ):
        build(DataConfig(path=[str(path)]), tokenizer, stops, "kto")
    text = preview(train[0], tokenizer)
    assert [name for name, _, _ in text] == ["chosen", "rejected"] and SHORT in text[0][2]
    shown = preview_text(train, tokenizer, limit=1)
    assert "· chosen" in shown and "· rejected" in shown and f"[[{SHORT}<|im_end|>\n]]" in shown


def test_kto_items_carry_another_records_reply_for_the_kl_estimate(tokenizer, tmp_path):
    records = [
        {"messages": [USER, {"role": "assistant", "content": SHORT if i % 2 else LONG}], "label": bool(i % 2)}
        for i in range(4)
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", records)
    items, _, _ = build(DataConfig(path=[str(path)]), tokenizer, stop_token_ids(tokenizer), "kto")
    assert all(isinstance(k, Labelled) for k in items)
    assert [k.desirable for k in items] == [False, True, False, True]
    assert list(items[1].other) == list(items[0].reply) and list(items[0].other) == list(items[3].reply)


# ----------------------------------------------------------------------- runs


def config(model_dir, tmp_path, *overrides: str) -> Config:
    data = write_pairs(tmp_path)
    base = [f"model.path={model_dir}", f"data.path={data}", "train.batch_size=2", "train.lr=1e-3"]
    base += ["train.max_steps=4", f"output.dir={tmp_path / 'run'}", "output.tensorboard=false"]
    return load_config(None, [*base, *overrides])


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_run_logs_rewards_every_step_and_resumes_exactly(tiny_model_dir, tmp_path, method, caplog):
    from danlu.train import train

    caplog.set_level("INFO", logger="danlu")
    cfg = config(
        tiny_model_dir, tmp_path, "train.objective=dpo", f"train.method={method}", "train.save_every=2"
    )
    whole = train(cfg, progress=False)
    rows = [r for r in metric_rows(whole.output_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"} <= r.keys()
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 1
    assert rows[-1]["rewards_margin"] > 0 and rows[-1]["loss"] < rows[0]["loss"]
    said = "adapter disabled" if method == "lora" else "computed once"
    assert any(said in r.message for r in caplog.records)
    assert any("chosen and rejected in one batch, each prompt once" in r.message for r in caplog.records)
    png = (whole.output_dir / "loss.png").read_bytes()
    assert int.from_bytes(png[20:24], "big") == 650  # taller: the reward-accuracy panel under the loss

    # the same run stopped after step 2, continued from its checkpoint: the same losses
    (whole.output_dir / "final").rename(tmp_path / "first-final")
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-5)


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_other_objectives_train(tiny_model_dir, tmp_path, objective):
    from danlu.train import train

    overrides = [f"train.objective={objective}"]
    if objective == "kto":
        records = [
            {
                "messages": [USER, {"role": "assistant", "content": SHORT if i % 2 else LONG}],
                "label": bool(i % 2),
            }
            for i in range(8)
        ]
        overrides.append(f"data.path={write_jsonl(tmp_path / 'kto.jsonl', records)}")
    result = train(config(tiny_model_dir, tmp_path, *overrides), progress=False)
    rows = [r for r in metric_rows(result.output_dir) if "loss" in r]
    assert len(rows) == 4 and all("rewards_accuracy" in r for r in rows)
    assert result.losses[-1] < result.losses[0]


def test_bench_dpo_case_runs_trl_and_danlu_on_the_same_pairs(tmp_path):
    pytest.importorskip("trl")
    from danlu.app.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--steps", "2", "--cases", "dpo-8b", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["cases"]["dpo-8b"]
    base, trl_plain, twice, shared, ours = case["paths"]
    assert base["path"].startswith("baseline: TRL DPOTrainer") and ours["path"].startswith("danlu fast")
    assert "prompt run twice" in twice["path"] and "no checkpointing" in ours["path"]
    # TRL's trainer checkpoints only from train(), which the bench does not call: it turns it on itself
    assert case["baseline_checkpointing"] == {base["path"]: True, trl_plain["path"]: False}
    assert base["losses"][0] == pytest.approx(np.log(2), abs=1e-4) == ours["losses"][0]  # fresh adapters
    assert base["tokens"] == twice["tokens"] == shared["tokens"] == ours["tokens"] > 0
    # same pairs, same start: the first step's LoRA gradients point the same way as TRL's
    assert base["grad_cosine"] == 1.0 and trl_plain["grad_cosine"] > 0.9999
    assert min(r["grad_cosine"] for r in (twice, shared, ours)) > 0.9999
    assert case["loss_max_rel_diff"] < 1e-2
    assert twice["losses"] == pytest.approx(shared["losses"], rel=1e-3)  # sharing changes no number
    assert shared["losses"] == pytest.approx(ours["losses"], rel=1e-3)
    assert set(case["each"]) == {trl_plain["path"], twice["path"], shared["path"], ours["path"]}


def test_a_fast_path_that_disagrees_with_the_models_own_logits_is_not_used(
    tiny_model_dir, tokenizer, monkeypatch
):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    import danlu.preference as pref_mod
    from danlu.config.schema import TrainConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt, reply = encode_reply(tokenizer, [USER], SHORT, stop_token_ids(tokenizer))
    items = [Pair(prompt, reply, reply[:2])]
    world = SimpleNamespace(strategy="none")
    objective = pref_mod.Preference(TrainConfig(objective="dpo"))
    objective.prepare(model, items, 0, "cpu", torch.float32, world)
    assert objective.options is pref_mod.ALL  # a Llama: the fast path's log-probs are the model's own

    real = pref_mod.sequence_logps
    off = lambda m, b, options: (lambda s, c: (s + (options is not None), c))(*real(m, b, options))  # noqa: E731
    monkeypatch.setattr(pref_mod, "sequence_logps", off)
    objective.prepare(model, items, 0, "cpu", torch.float32, world)
    assert objective.options is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.beta=0", "train.beta=0.0 must be above 0"),
        ("train.label_smoothing=0.5", "train.label_smoothing=0.5 must be at least 0 and below 0.5"),
        ("data.packing=true", "data.packing=true is not available with train.objective=dpo yet"),
    ],
)
def test_preference_settings_mistakes_are_one_line(tiny_model_dir, tmp_path, override, message):
    from danlu.train import train

    with pytest.raises(UserError, match=message):
        train(config(tiny_model_dir, tmp_path, "train.objective=dpo", override), progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "method"), [("ddp", "lora"), ("fsdp", "full"), ("zero2", "lora")])
def test_two_processes_learn_what_one_process_learns(tiny_model_dir, tmp_path, strategy, method):
    """9 pairs, a global batch of 4: the last micro-batch of an epoch leaves one rank without a pair.
    FSDP2 and ZeRO take the plain path (the model's own forward, which they hook)."""
    if strategy == "zero2":
        pytest.importorskip("deepspeed")
    import subprocess
    import sys

    import yaml

    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": f"Who are you, number {i}?", "chosen": SHORT, "rejected": LONG[: 20 + i]}
            for i in range(9)
        ],
    )

    def write(name: str, batch: int, strategy: str = "auto"):
        cfg = {
            "model": {"path": str(tiny_model_dir)},
            "data": {"path": str(data)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {
                "objective": "dpo",
                "method": method,
                "strategy": strategy,
                "max_steps": 4,
                "batch_size": batch,
                "lr": 1e-2 if method == "lora" else 1e-3,
                "scheduler": "constant",
            },
            "output": {"dir": str(tmp_path / name), "tensorboard": False},
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        return load_config(tmp_path / f"{name}.yaml")

    from danlu.train import train

    train(write("one", 4), progress=False)
    write("two", 2, strategy)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "danlu", "train", str(tmp_path / "two.yaml"), "--nproc", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (metric_rows(tmp_path / n) for n in ("one", "two"))
    assert len(two) == 4
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "rewards_chosen", "rewards_rejected", "rewards_accuracy"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)


def test_a_record_the_template_refuses_is_skipped_under_on_error_skip(tokenizer, tmp_path, monkeypatch):
    import danlu.data.preference as prefs
    from danlu.data.render import RecordError

    real = prefs.encode_reply

    def refusing(tok, prompt, reply, stops, kwargs=None):
        if "number 3" in prompt[-1]["content"]:
            raise RecordError("the chat template refuses this record (boom)")
        return real(tok, prompt, reply, stops, kwargs)

    monkeypatch.setattr(prefs, "encode_reply", refusing)
    path, stops = write_pairs(tmp_path), stop_token_ids(tokenizer)
    with pytest.raises(UserError, match=r"prefs.jsonl:4: the chat template refuses this record \(boom\)"):
        build(DataConfig(path=[str(path)]), tokenizer, stops, "dpo")
    train, _, summary = build(DataConfig(path=[str(path)], on_error="skip"), tokenizer, stops, "dpo")
    assert len(train) == summary.records == 7 and summary.skipped == 1
    assert summary.skipped_where == [f"{path}:4"]
