"""`danlu board`: the logic behind the page, without a browser: presets, configs and the form, the
command lines it runs (each parses as the CLI's own), what commands print (errors, `danlu plan`'s
verdict, the data preview). Runs and their processes: tests/test_board_runs.py; the page in
headless Chromium: tests/test_board_browser.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from danlu.app import board_config as bc
from danlu.app import board_runs as br
from danlu.app.board_view import plan_markdown
from danlu.errors import UserError

IDENTITY = bc.PRESETS / "identity.json"


# ------------------------------------------------------------------------ configs and forms


def test_the_verb_is_registered_light_and_refuses_a_busy_port(capsys):
    """`danlu board --help` loads neither torch nor gradio; a port in use is one line."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom danlu.app.cli import main\ntry:\n    main(['board', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'gradio', 'transformers', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: danlu board" in out and "--runs RUNS" in out
    assert out.strip().splitlines()[-1] == "HEAVY []"
    pytest.importorskip("gradio")
    from danlu.app.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        assert main(["board", "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"danlu: error: --port {port}: 127.0.0.1:{port} is in use; pick another port"
    )


def test_presets_and_bundled_data_are_the_packaged_ones():
    names = bc.presets()
    assert {"identity", "qlora-7b", "lora-7b"} <= set(names)
    assert names["identity"].startswith("Self-identity demo")  # the file's first comment, as configs list
    assert bc.bundled_data()["identity.json"] == IDENTITY
    cfg = bc.preset_config("identity")
    assert cfg["data"]["path"] == [str(IDENTITY)]  # bundled data made absolute: it lives in the package
    with pytest.raises(UserError, match="no preset named 'nope'; known: .*identity"):
        bc.preset_config("nope")


def test_board_config_asks_sample_questions_and_keeps_the_chosen_model_and_data():
    cfg = bc.board_config("identity")
    assert cfg["train"]["eval_prompts"] == ["你是谁？", "Who are you?"]
    assert cfg["train"]["sample_every"] == 10  # 30 steps: answers at 0, 10, 20, 30
    current = {
        "model": {"path": "/models/mine"},
        "data": {"path": ["/data/a.jsonl"], "placeholders": {"name": "Ada"}},
        "output": {"dir": "out/ada"},
        "train": {"lr": 5.0},
    }
    cfg = bc.board_config("qlora-7b", current)
    assert cfg["model"]["path"] == "/models/mine" and cfg["data"]["path"] == ["/data/a.jsonl"]
    assert cfg["data"]["placeholders"] == {"name": "Ada"} and cfg["output"]["dir"] == "out/ada"
    assert cfg["model"]["quantization"] == "nf4" and cfg["train"]["lr"] != 5.0  # training from the preset


def test_yaml_edits_one_key_at_a_time():
    cfg = bc.parse("model: {path: a}\ntrain:\n  lr: 1e-3\n")
    edited = bc.put(cfg, "data.placeholders.name", "Ada")
    assert edited["data"] == {"placeholders": {"name": "Ada"}} and "data" not in cfg  # a copy
    assert bc.get(edited, "train.lr") == "1e-3" and bc.get(edited, "train.nope", 7) == 7
    assert "max_steps" not in bc.put({"train": {"max_steps": 5}}, "train.max_steps", None)["train"]
    assert bc.parse(bc.dump(edited)) == edited
    with pytest.raises(UserError, match=r"^config line 3: not valid YAML \(mapping values are not allowed"):
        bc.parse("model:\n  path: a\n  lr: 1: 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        bc.parse("- a list")


def test_form_fields_write_their_keys_the_way_the_schema_wants():
    cfg = bc.board_config("identity")
    values = bc.form_values(cfg)
    assert values["steps"] == 30 and values["rank"] == 16 and values["lr"] == "0.001"
    assert values["quantization"] == "none" and values["packing"] is False  # schema defaults
    assert values["prompts"] == "你是谁？\nWho are you?"
    cfg = bc.set_field(cfg, "lr", " 2e-4 ")
    assert cfg["train"]["lr"] == 2e-4
    cfg = bc.set_field(cfg, "steps", 0)  # 0: train for epochs instead
    assert "max_steps" not in cfg["train"] and bc.form_values(cfg)["steps"] == 0
    cfg = bc.set_field(cfg, "prompts", "Hi\n\n  Who made you? \n")
    assert cfg["train"]["eval_prompts"] == ["Hi", "Who made you?"]
    cfg = bc.set_field(cfg, "rank", 8.0)
    assert cfg["lora"]["r"] == 8 and isinstance(cfg["lora"]["r"], int)
    assert bc.set_field(cfg, "quantization", "nf4")["model"]["quantization"] == "nf4"
    with pytest.raises(UserError, match="learning rate 'fast': give a number such as 2e-4"):
        bc.set_field(cfg, "lr", "fast")


def test_form_edits_merge_into_the_yaml_without_undoing_each_other():
    cfg = bc.board_config("identity")
    text, base = bc.dump(cfg), bc.form_values(cfg)
    assert base["model"] == "smollm2-135m-instruct" and base["data"] == str(IDENTITY)
    assert base["placeholders"] == {"name": "Danlu", "author": "Furnace Lab"}
    # two edits in flight at once, both against the same YAML: the later one carries both fields
    first, _ = bc.merge_form(text, base, {**base, "steps": 6})
    second, now = bc.merge_form(text, base, {**base, "steps": 6, "sample_every": 3})
    assert bc.parse(first)["train"]["max_steps"] == 6
    assert (bc.parse(second)["train"]["max_steps"], bc.parse(second)["train"]["sample_every"]) == (6, 3)
    assert now["steps"] == 6 and bc.merge_form(second, now, now) == (second, now)  # nothing changed
    # a value typed into the YAML by hand stays when the form (not changed there) is sent again
    hand = bc.dump(bc.put(bc.parse(second), "train.lr", 5e-4))
    kept, _ = bc.merge_form(hand, now, {**now, "rank": 4})
    assert bc.parse(kept)["train"]["lr"] == 5e-4 and bc.parse(kept)["lora"]["r"] == 4
    form = {**now, "model": " /m ", "data": "a.jsonl\nb.jsonl", "output": "out/x"}
    form["placeholders"] = {"name": "Ada", "author": "Furnace Lab"}
    done = bc.parse(bc.merge_form(second, now, form)[0])
    assert done["model"]["path"] == "/m" and done["data"]["path"] == ["a.jsonl", "b.jsonl"]
    assert done["data"]["placeholders"] == {"name": "Ada", "author": "Furnace Lab"}
    assert done["output"]["dir"] == "out/x"
    with pytest.raises(UserError, match="learning rate"):
        bc.merge_form(second, now, {**now, "lr": "fast"})


def test_a_run_config_is_written_and_checked_as_danlu_train_will(tmp_path):
    runs = tmp_path / "out"
    text = bc.dump(bc.board_config("identity"))
    assert bc.next_name(runs, "identity") == "identity"
    path = bc.write_run_config(text, runs, "identity")
    assert path == runs / "identity.yaml"
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["output"]["dir"] == str(runs / "identity")
    assert bc.next_name(runs, "identity") == "identity-2"
    (runs / "identity-2").mkdir()
    (runs / "identity-2" / "danlu_config.yaml").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="already holds a run: choose another run name"):
        bc.write_run_config(text, runs, "identity-2")
    bad = bc.put(bc.parse(text), "train.learning_rate", 1e-4)
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rate'; did you mean 'train.lr'\?"):
        bc.write_run_config(bc.dump(bad), runs, "typo")
    assert not (runs / "typo.yaml").exists()  # nothing left behind for a config that does not load
    with pytest.raises(UserError, match="run name"):
        bc.write_run_config(text, runs, "../elsewhere")


def test_data_placeholders_and_the_data_command_line(tmp_path):
    assert bc.placeholders_in([str(IDENTITY)]) == ["name", "author"]
    other = tmp_path / "d.jsonl"
    other.write_text('{"instruction": "{{ city }}?", "output": "{{name}}"}\n', encoding="utf-8")
    assert bc.placeholders_in([str(IDENTITY), str(tmp_path)]) == ["name", "author", "city"]
    assert bc.data_paths("a.jsonl\n b.json, c.csv\n\n") == ["a.jsonl", "b.json", "c.csv"]
    cfg = bc.put(bc.board_config("identity"), "data.template", "chatml")
    args = bc.data_args("stats", ["x.json"], cfg, "--out", "h.png")
    assert args[:5] == ["data", "stats", "x.json", "--model", "smollm2-135m-instruct"]
    assert args[5:9] == ["--template", "chatml", "--out", "h.png"]
    assert "data.max_seq_length=256" in args and "data.placeholders.author=Furnace Lab" in args
    assert not any(a.startswith("data.path") for a in args)


def test_preference_presets_show_their_objective_and_check_their_data_that_way(tmp_path):
    pytest.importorskip("gradio")
    from danlu.app.board import Board

    cfg = bc.board_config("prefer-short")
    assert bc.form_values(cfg)["objective"] == "orpo"  # the preset's, shown in the form
    cfg = bc.set_field(cfg, "objective", "dpo")
    assert cfg["train"]["objective"] == "dpo"
    for action in ("check", "preview"):
        args = bc.data_args(action, ["p.jsonl"], cfg)
        assert args[args.index("--objective") + 1] == "dpo"
    assert "--objective" not in bc.data_args("check", ["x.json"], bc.board_config("identity"))
    # the Data step on the bundled pairs: read as DPO reads them (no "no assistant reply" refusal)
    board = Board(tmp_path / "out")
    try:
        pairs = str(bc.bundled_data()["prefer_short.jsonl"])
        *_, (verdict, transcript, histogram, marked) = board.check_data(pairs, bc.dump(cfg))
    finally:
        board.close()
    assert verdict.startswith("**✓"), verdict
    assert f"danlu data check {pairs} --model smollm2-135m-instruct" in transcript
    assert "--objective dpo" in transcript and "preference pairs" in transcript
    assert histogram is None and "rejected" in marked.lower()


def test_command_lines_are_the_clis(tmp_path):
    assert bc.train_args("out/a.yaml") == ["train", "out/a.yaml", "--no-progress"]
    assert bc.train_args("out/a.yaml", resume=True)[-1] == "--resume"
    assert bc.plan_args("c.yaml", " 16GB ") == ["plan", "c.yaml", "--gpu-mem", "16GB"]
    assert bc.plan_args("c.yaml", "") == ["plan", "c.yaml"]
    out = tmp_path / "merged"
    assert bc.merge_args(Path("r/final"), out) == ["merge", "--adapter", "r/final", "--out", str(out)]
    out.mkdir()
    assert bc.merge_args(Path("r/final"), out)[-1] == "--overwrite"  # the board's own folder, again
    assert bc.gguf_args(out, tmp_path / "m.gguf", "q8_0")[:3] == ["export", "gguf", "--model"]
    assert bc.gguf_args(out, tmp_path / "m.gguf", "q8_0", "ollama")[:2] == ["export", "ollama"]
    (tmp_path / "m.Modelfile").write_text("FROM m.gguf\n")  # a Modelfile there: replaced, when asked
    assert bc.gguf_args(out, tmp_path / "m.gguf", "q8_0", "ollama")[-1] == "--overwrite"
    assert bc.gguf_args(out, tmp_path / "m.gguf", "q8_0")[-1] == "q8_0"  # export gguf writes no Modelfile
    assert bc.serve_args("ada", Path("r/final"), 8001, adapter=True) == [
        "serve", "--adapter", "ada=r/final", "--port", "8001",
    ]  # fmt: skip
    assert bc.serve_args("ada", Path("r/final"), 8001, adapter=False)[1:3] == ["--model", "r/final"]
    assert bc.shown(["data", "check", "my data.json"]) == "danlu data check 'my data.json'"
    # every command line the board builds parses as the CLI's own
    from danlu.app.cli import build_parser

    for args in (bc.train_args("a.yaml", True), bc.plan_args("a.yaml", "8GB"), bc.merge_args(Path("f"), out)):
        build_parser().parse_args(args)


def test_errors_are_the_one_line_the_cli_printed():
    assert bc.cli_error("danlu: data ...\ndanlu: error: bad.jsonl:2: malformed\n") == (
        "danlu: error: bad.jsonl:2: malformed"
    )
    crash = 'Traceback (most recent call last):\n  File "x", line 1\nRuntimeError: boom\n'
    assert bc.cli_error(crash) == "RuntimeError: boom"
    assert bc.cli_error("danlu: saved adapter\n") is None
    assert bc.failure(2, "danlu: x\ndanlu: error: no\n") == "danlu: error: no"
    assert bc.failure(1, "something odd\n\n") == "something odd"
    assert bc.failure(-9, "") == "the command exited with code -9"


def test_plan_verdicts_read_from_the_real_danlu_plan():
    preset = str(bc.PRESETS / "lora-7b.yaml")
    rc, out, _ = br.run_cli(["plan", preset, "--shape", "qwen2.5-7b", "--gpu-mem", "16GB"])
    assert rc == 0
    verdict = bc.plan_verdict(out)
    assert verdict.fits is False and verdict.line.startswith("does not fit: ")
    assert verdict.suggestions == ["model.quantization=nf4"]
    fixed = bc.apply_overrides(bc.preset_config("lora-7b"), verdict.suggestions[0])
    assert fixed["model"]["quantization"] == "nf4"
    assert bc.apply_overrides({}, "train.gradient_checkpointing=true train.batch_size=1") == {
        "train": {"gradient_checkpointing": True, "batch_size": 1}
    }
    rc, out, _ = br.run_cli(["plan", preset, "--shape", "qwen2.5-7b", "--gpu-mem", "24GB"])
    assert bc.plan_verdict(out).fits is True
    assert bc.plan_verdict("...\nno CUDA GPU here: pass --gpu-mem 24GB to check").fits is None
    page = plan_markdown("danlu plan CONFIG", 2, "", "danlu: error: model.path x: not downloaded", None)
    assert "**✗ danlu: error: model.path x: not downloaded**" in page


def test_preview_marks_trained_tokens_and_escapes_the_rest():
    out = "── a.json:1 ──\n<|im_start|>user\nhi<b><|im_end|>\n<|im_start|>assistant\n⟦Hello!<|im_end|>\n⟧"
    marked = bc.preview_html(out)
    assert '<mark class="trained">Hello!&lt;|im_end|&gt;\n</mark>' in marked
    assert "<b>" not in marked and "hi&lt;b&gt;" in marked
