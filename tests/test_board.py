"""`danlu board`: the logic behind the page (configs, command lines, runs, what commands print), then
the page itself driven in headless Chromium (Debian's package, through Playwright, as
tests/test_web.py does; skipped without it).

The browser tests serve the board in this process on a free port; the commands it runs are real
``python -m danlu`` processes. The journey trains the tiny random Llama for a few steps on the CPU
(with ``DANLU_UPDATE_DOCS=1``: the embedded default model for 30 steps, and the screenshots go to
docs/ instead of the test's folder).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from browser import CHROMIUM
from browser import browser_page as page_at
from danlu.app import board_config as bc
from danlu.app import board_runs as br
from danlu.app.board_view import plan_markdown, progress_html, samples_html
from danlu.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
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


# ----------------------------------------------------------------------------------- runs


def fake_run(runs: Path, name: str, rows: list[dict], cfg: dict | None = None, final: bool = False) -> Path:
    """A run folder as `danlu train` leaves it (config, summary, metrics, maybe final/)."""
    folder = runs / name
    folder.mkdir(parents=True)
    cfg = cfg or {"model": {"path": "tiny"}, "train": {"max_steps": 6}}
    (folder / "danlu_config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    (folder / "data_summary.json").write_text(json.dumps({"samples": 56}), encoding="utf-8")
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(lines + '{"step": 7, "lo', encoding="utf-8")  # being written
    if final:
        (folder / "final").mkdir()
        (folder / "final" / "adapter_config.json").write_text("{}", encoding="utf-8")
    return folder


ROWS = [
    {"step": 0, "samples": [{"prompt": "你是谁？", "answer": "<i>base</i>"}]},
    {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0},
    {"step": 2, "loss": 2.0, "lr": 5e-4},
    {"step": 2, "eval_loss": 2.2},
    {"step": 2, "samples": [{"prompt": "你是谁？", "answer": "我是Ada"}]},
]


def test_metrics_become_curves_samples_and_progress(tmp_path):
    folder = fake_run(tmp_path, "a", ROWS)
    rows = br.read_metrics(folder / "metrics.jsonl")
    assert len(rows) == 5  # the half-written last line is skipped
    loss, lr = br.curves(rows)
    assert [(p["step"], p["value"], p["series"]) for p in loss] == [
        (1, 2.5, "train loss"), (2, 2.0, "train loss"), (2, 2.2, "eval loss"),
    ]  # fmt: skip
    assert [p["value"] for p in lr] == [1e-3, 5e-4]
    assert [step for step, _ in br.samples(rows)] == [0, 2]
    html = samples_html(br.samples(rows))
    assert html.index("step 2") < html.index("base model")  # newest first; step 0 is the base's
    assert "&lt;i&gt;base&lt;/i&gt;" in html and "我是Ada" in html
    assert br.last(rows, "loss") == 2.0


def test_total_steps_as_danlu_train_counts_them():
    assert br.total_steps({"train": {"max_steps": 30}}, None) == 30
    assert br.total_steps({"train": {"epochs": 3}}, None) is None  # known once the data is read
    assert br.total_steps({"train": {"epochs": 3, "batch_size": 4}}, {"samples": 56}) == 42
    assert br.total_steps({"train": {"epochs": 1, "batch_size": 2, "grad_accum": 4}}, {"samples": 9}) == 2
    assert br.total_steps({"train": {"epochs": 2}, "data": {}}, {"samples": 99, "packed_rows": 8}) == 4


def test_eta_from_the_pace_the_board_saw():
    pace = br.Pace()
    pace.observe("r", 3, 100.0)
    assert pace.seconds_per_step("r") is None
    pace.observe("r", 3, 104.0)
    pace.observe("r", 7, 108.0)
    assert pace.seconds_per_step("r") == 2.0
    assert br.eta(7, 10, 2.0) == 6.0 and br.eta(10, 10, 2.0) is None and br.eta(3, None, 2.0) is None
    assert br.duration(6) == "0:06" and br.duration(3725) == "1:02:05"


def test_status_of_runs_started_anywhere():
    assert br.status(True, True, False, "", None) == ("starting", "")
    assert br.status(True, True, False, "", 1.0) == ("running", "")
    assert br.status(False, True, True, "", 1.0) == ("finished", "")
    log = "danlu: data ...\ndanlu: error: bad.jsonl:2: malformed JSON Lines record\n"
    assert br.status(False, True, False, log, None) == (
        "failed",
        "danlu: error: bad.jsonl:2: malformed JSON Lines record",
    )
    assert br.status(False, True, False, "danlu: training", 1.0) == ("stopped", "")  # stopped from the board
    resumed = f"$ danlu train x.yaml\n{log}$ danlu train x.yaml --resume\ndanlu: resuming from checkpoint-4\n"
    assert br.status(False, True, False, resumed, 1.0) == ("stopped", "")  # the old error is history
    assert br.status(False, False, False, "", 5.0) == ("running", "started outside the board")
    assert br.status(False, False, False, "", 1e4) == ("stopped", "")


def test_runs_from_the_terminal_and_the_board_are_listed(tmp_path):
    runs = tmp_path / "out"
    fake_run(runs, "done", ROWS, final=True)
    live = fake_run(runs, "live", ROWS[:2])
    old = fake_run(runs, "old", ROWS[:2])
    os.utime(old / "metrics.jsonl", (time.time() - 3600,) * 2)
    os.utime(old / "danlu_config.yaml", (time.time() - 3600,) * 2)
    (runs / "merged").mkdir()  # not a run: no danlu_config.yaml
    br.notes(runs, "serve", "log").parent.mkdir()
    br.notes(runs, "serve", "log").write_text("the API server's log, not a run's\n")
    procs = br.Processes()
    found = {r.name: r for r in br.scan(runs, procs)}
    assert set(found) == {"done", "live", "old"}
    assert found["done"].status == "finished" and found["done"].has_final and found["done"].adapter
    assert (found["done"].step, found["done"].total, found["done"].loss) == (2, 6, 2.0)
    assert found["live"].status == "running" and found["old"].status == "stopped"
    assert br.scan(runs, procs)[-1].name == "old"  # newest first
    row = next(r for r in br.table(list(found.values())) if r[0] == "done")
    assert row[1:5] == ["finished", "2/6", "2.0000", "tiny"]
    page = progress_html(found["live"], 2.0)
    assert 'data-status="running"' in page and "step 1/6" in page and "ETA 0:10" in page
    assert live.exists()


def test_on_a_gpu_a_run_that_does_not_fit_is_refused_before_it_starts(tiny_model_dir, tmp_path):
    pytest.importorskip("gradio")
    from danlu.app.board import Board

    runs = tmp_path / "out"
    board = Board(runs)
    board.gpu_budget = lambda: "1GB"  # as if this machine had a 1 GB GPU
    try:
        text = bc.dump(bc.board_config("identity", {"model": {"path": str(tiny_model_dir)}}))
        message, _, _ = board.start(text, str(runs), "big")
        assert re.fullmatch(
            r"\*\*✗ does not fit: [\d.]+ GiB needed, 1\.0 GiB available \(--gpu-mem 1GB\); "
            r"可改为 · to fit: train\.gradient_checkpointing=true .*\*\*",
            message,
        ), message
        assert not (runs / "big.yaml").exists() and not br.notes(runs, "big", "pid").exists()
    finally:
        board.close()


def test_a_run_the_board_starts_is_a_separate_process_and_its_error_is_one_line(tmp_path):
    """The board's process for a run that stops on a user mistake: listed as failed, with the
    CLI's one line (not a traceback)."""
    runs = tmp_path / "out"
    runs.mkdir()
    config = runs / "x.yaml"  # as the board writes it, with a mistake the loader stops on
    config.write_text("train:\n  learning_rate: 1e-4\n", encoding="utf-8")
    procs = br.Processes()
    pid = procs.start(bc.train_args(config), br.notes(runs, "x", "log"), br.notes(runs, "x", "pid"))
    assert procs.pid_of(runs, "x") == pid and pid != os.getpid()
    deadline = time.time() + 120
    while procs.alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    (run,) = br.scan(runs, procs)
    assert (run.name, run.status) == ("x", "failed")
    assert (
        run.message
        == f"danlu: error: {config}:2: unknown key 'train.learning_rate'; did you mean 'train.lr'?"
    )
    assert br.log_tail(runs, "x").startswith(f"$ danlu train {config} --no-progress\n")
    assert "Traceback" not in br.log_tail(runs, "x")
    assert not procs.stop(pid)  # ended already


def wait_for(check: Any, seconds: float) -> Any:
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s")


@pytest.mark.slow
def test_stop_and_resume_a_run_from_the_board(tiny_model_dir, tmp_path):
    """Start runs `danlu train` in its own process; Stop terminates it (a stopped run, its
    checkpoints kept); Resume continues it with --resume from the latest checkpoint."""
    from danlu.app.board import Board

    runs = tmp_path / "out"
    board = Board(runs)
    cfg = bc.board_config("identity", {"model": {"path": str(tiny_model_dir)}})
    for key, value in {"train.max_steps": 500, "train.save_every": 2, "train.eval_prompts": []}.items():
        cfg = bc.put(cfg, key, value)
    try:
        message, _, name_after = board.start(bc.dump(cfg), str(runs), "long")
        assert message == f"▶ `danlu train {runs}/long.yaml --no-progress`" and name_after == "long-2"
        wait_for(lambda: (runs / "long" / "checkpoint-4").is_dir(), 180)
        (run,) = br.scan(runs, board.procs)
        assert run.status == "running" and run.total == 500
        assert board.stop(str(runs), "long") == "■ 已停止 · stopped long"
        (run,) = br.scan(runs, board.procs)
        assert run.status == "stopped" and 4 <= run.step < 500, run
        assert not board.procs.alive(board.procs.pid_of(runs, "long"))
        message, _, _ = board.start("", str(runs), "long", resume_name="long")
        assert message == f"▶ `danlu train {runs}/long.yaml --no-progress --resume`"
        assert "is running already" in board.start("", str(runs), "long", resume_name="long")[0]
        log = wait_for(lambda: re.search(r"resuming from checkpoint-(\d+)", br.log_tail(runs, "long")), 180)
        assert int(log.group(1)) >= 4
        wait_for(lambda: br.scan(runs, board.procs)[0].step > run.step, 180)  # further than before
        assert br.scan(runs, board.procs)[0].status == "running"
        assert board.stop(str(runs), "long").startswith("■")
    finally:
        board.procs.stop_all()
        board.close()


# ------------------------------------------------------------------------------ the page


@contextmanager
def serving(runs: Path) -> Iterator[tuple[str, Any]]:
    """The board on a free localhost port in this process; yields (URL, Board)."""
    pytest.importorskip("gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from danlu.app.board import Board, build_board, launch

    board = Board(runs)
    demo = build_board(board)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, "127.0.0.1", port, False, board, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", board
    finally:
        demo.close()
        board.procs.stop_all()
        board.close()


def browser_page(url: str) -> Iterator[Any]:
    return page_at(url, 1200, 1000)


def field(page: Any, elem_id: str) -> Any:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def config_yaml(page: Any) -> dict:
    return yaml.safe_load(page.locator("#config-yaml .cm-content").inner_text())


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason="needs Debian's chromium: apt-get install -y chromium"
)


def plot_points(page: Any, elem_id: str) -> int:
    """Points on the first line of a LinePlot (an SVG path of M and L commands); 0 before it draws."""
    path = page.locator(f"#{elem_id} .mark-line path").first
    if not page.locator(f"#{elem_id} .mark-line path").count():
        return 0
    return len(re.findall(r"[ML]", path.get_attribute("d") or ""))


def shot(page: Any, path: Path, first: str, last: str) -> None:
    """A screenshot of the page from the top of ``first`` to the bottom of ``last``."""
    top = page.locator(first).bounding_box()
    bottom = page.locator(last).bounding_box()
    y = max(0.0, top["y"] + page.evaluate("window.scrollY") - 16)
    end = bottom["y"] + page.evaluate("window.scrollY") + bottom["height"] + 16
    page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": y, "width": 1200, "height": end - y})
    assert path.stat().st_size > 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_chromium
def test_mistakes_show_in_the_page_as_the_clis_one_line(tiny_model_dir, tmp_path):
    """A config that does not fit, a bad data file (checked, then trained on), a bad learning rate:
    each is the one line the CLI prints, in the page, never a traceback."""
    from playwright.sync_api import expect

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": broken\n', encoding="utf-8")
    config = tmp_path / "plan.yaml"
    config.write_text(bc.dump(bc.put(bc.board_config("identity"), "model.path", str(tiny_model_dir))))
    rc, out, _ = br.run_cli(bc.plan_args(config, "1GB"))
    line = bc.plan_verdict(out).line  # what `danlu plan` itself says
    assert rc == 0 and line.startswith("does not fit: ")
    runs = tmp_path / "out"
    with serving(runs) as (url, _), browser_page(url) as page:
        expect(field(page, "model")).to_be_editable(timeout=60_000)
        field(page, "model").fill(str(tiny_model_dir))
        field(page, "gpu-mem").fill("1GB")
        page.locator("#check-model").click()
        expect(page.locator("#plan")).to_contain_text(f"✗ {line}", timeout=120_000)
        expect(page.locator("#env")).to_contain_text("RAM")
        page.locator("#apply-fix").click()  # the first suggestion: gradient checkpointing and smaller batches
        tab(page, "3 Train")
        expect(page.locator("#config-yaml")).to_contain_text("gradient_checkpointing: true", timeout=30_000)
        assert config_yaml(page)["model"]["path"] == str(tiny_model_dir)

        tab(page, "2 Data")
        field(page, "data-path").fill(str(bad))
        page.locator("#check-data").click()
        error = f"danlu: error: {bad}:2: malformed JSON Lines record (Expecting value)"
        expect(page.locator("#data-verdict")).to_contain_text(f"✗ {error}", timeout=120_000)

        tab(page, "3 Train")
        field(page, "lr").fill("fast")
        expect(page.locator("#form-message")).to_contain_text(
            "learning rate 'fast': give a number such as 2e-4"
        )
        field(page, "lr").fill("1e-3")
        expect(page.locator("#config-yaml")).to_contain_text(str(bad), timeout=30_000)
        page.locator("#start").click()  # training on the bad file: its process stops on the same line
        expect(page.locator("#train-message")).to_contain_text(f"danlu train {runs}/identity.yaml")
        expect(page.locator("#run-progress")).to_have_attribute("data-status", "failed", timeout=120_000)
        expect(page.locator("#run-progress")).to_contain_text(error)
        expect(page.locator("#runs")).to_contain_text("failed: danlu: error:")
        page.screenshot(path=str(tmp_path / "board-errors.png"), full_page=True)
        assert "Traceback" not in page.content()


@needs_chromium
@pytest.mark.slow
def test_the_journey_in_the_browser_model_data_train_try_ship(tiny_model_dir, tmp_path):
    """Model → data (placeholders filled) → a short CPU run watched live to the end → base and tuned
    answer "你是谁？" side by side → merged, exported to GGUF and served. Screenshots of the train and
    compare steps land in the test's folder (docs/ with DANLU_UPDATE_DOCS=1, trained on the embedded
    default model then)."""
    from playwright.sync_api import expect

    from danlu.infer import Engine, GenerationSettings

    docs = os.environ.get("DANLU_UPDATE_DOCS") == "1"
    model = "smollm2-135m-instruct" if docs else str(tiny_model_dir)
    steps, every = (30, 10) if docs else (6, 3)
    shots = ROOT / "docs" if docs else tmp_path
    wait = 4 if docs else 1  # the real model is slower in every step
    runs = tmp_path / "out"
    with serving(runs) as (url, board), browser_page(url) as page:
        # 1 model: what danlu env and danlu plan say, before anything loads
        expect(field(page, "model")).to_be_editable(timeout=60_000 * wait)
        field(page, "model").fill(model)
        page.locator("#check-model").click()
        expect(page.locator("#plan")).to_contain_text("danlu plan CONFIG", timeout=120_000 * wait)
        expect(page.locator("#plan")).to_contain_text("trainable")  # the estimate's table

        # 2 data: the bundled identity set, its placeholders in the form, checked as training reads it
        tab(page, "2 Data")
        expect(field(page, "data-path")).to_have_value(str(IDENTITY))
        expect(page.locator("#placeholder-0 label, #placeholder-0").first).to_contain_text("{{name}}")
        field(page, "placeholder-0").fill("Ada")
        page.locator("#check-data").click()
        expect(page.locator("#data-verdict")).to_contain_text("ready to train", timeout=120_000 * wait)
        expect(page.locator("#data-report")).to_contain_text("records:    56")
        expect(page.locator("#data-preview mark.trained").nth(1)).to_contain_text("I am Ada")  # 0: the legend
        expect(page.locator("#histogram img")).to_be_visible()

        # 3 train: a few steps, watched live
        tab(page, "3 Train")
        field(page, "steps").fill(str(steps))
        field(page, "sample-every").fill(str(every))
        expect(page.locator("#config-yaml")).to_contain_text(f"sample_every: {every}", timeout=30_000 * wait)
        cfg = config_yaml(page)
        assert cfg["model"]["path"] == model and cfg["train"]["max_steps"] == steps
        assert cfg["data"]["placeholders"]["name"] == "Ada" and cfg["output"]["dir"] == str(runs / "identity")
        page.locator("#start").click()
        expect(page.locator("#train-message")).to_contain_text(
            f"danlu train {runs}/identity.yaml --no-progress"
        )
        progress = page.locator("#run-progress")
        seen: list[tuple[str, int]] = []
        deadline = time.time() + 150 * wait * (5 if docs else 1)
        while time.time() < deadline:
            if progress.count():
                state = (progress.get_attribute("data-status") or "", plot_points(page, "loss-plot"))
                if not seen or state != seen[-1]:
                    seen.append(state)
                if state[0] in ("finished", "failed"):
                    break
            time.sleep(0.3)
        assert seen[-1] == ("finished", steps), seen
        assert any(status == "running" for status, _ in seen), seen  # the page followed the run
        expect(progress).to_contain_text(f"step {steps}/{steps}")
        assert plot_points(page, "lr-plot") == steps
        samples = page.locator("#samples")
        expect(samples).to_contain_text(f"step {steps}")
        expect(samples).to_contain_text("base model")
        expect(samples).to_contain_text("你是谁？")
        expect(page.locator("#runs")).to_contain_text("finished")
        page.wait_for_timeout(500)
        shot(page, shots / "board-train.png", "#start", "#samples")

        # 4 try it: the same question to base and tuned
        tab(page, "4 Try it")
        expect(field(page, "try-run")).to_have_value("identity", timeout=30_000 * wait)
        field(page, "prompt").fill("你是谁？")
        page.locator("#ask").click()
        expect(page.locator("#try-message")).to_contain_text("✓ identity", timeout=180_000 * wait)
        base_reply = page.locator("#base-chat [data-testid='bot']").last.inner_text()
        tuned_reply = page.locator("#tuned-chat [data-testid='bot']").last.inner_text()
        shot(page, shots / "board-compare.png", "#try-run", "#try-message")
        engine = Engine(model, runs / "identity" / "final")
        settings = GenerationSettings(max_new_tokens=64, temperature=0)
        question = [{"role": "user", "content": "你是谁？"}]
        for shown, adapter in ((base_reply, False), (tuned_reply, True)):
            expected = engine.reply(question, settings, use_adapter=adapter)
            assert " ".join(shown.split()) == " ".join(expected.split()), (adapter, shown, expected)
        if docs:
            assert "Ada" in tuned_reply and "Ada" not in base_reply

        # 5 ship it: merge + GGUF, then the API server; each shows the command it ran
        tab(page, "5 Ship it")
        expect(field(page, "ship-run")).to_have_value("identity", timeout=30_000 * wait)
        page.locator("#gguf").click()
        log = page.locator("#ship-log")
        expect(log).to_contain_text("wrote ", timeout=300_000 * wait)
        merged, gguf = runs / "identity-merged", runs / "identity.f16.gguf"
        expect(log).to_contain_text(f"$ danlu merge --adapter {runs}/identity/final --out {merged}")
        expect(log).to_contain_text(f"$ danlu export gguf --model {merged} --out {gguf} --type f16")
        assert (merged / "config.json").is_file() and gguf.stat().st_size > 100_000
        page.locator("#ollama").click()  # the same GGUF again, with a Modelfile for `ollama create`
        expect(log).to_contain_text(
            f"$ danlu export ollama --model {merged} --out {gguf} --type f16 --overwrite",
            timeout=60_000 * wait,
        )
        expect(log).to_contain_text("ollama create", timeout=300_000 * wait)
        assert "FROM " in gguf.with_suffix(".Modelfile").read_text()
        port = free_port()
        field(page, "port").fill(str(port))
        page.locator("#serve").click()
        expect(log).to_contain_text(
            f"OpenAI-compatible API at http://127.0.0.1:{port}/v1", timeout=300_000 * wait
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
            assert "identity" in [m["id"] for m in json.load(r)["data"]]
        page.locator("#stop-serve").click()
        expect(log).to_contain_text("server stopped", timeout=60_000 * wait)
        assert board.ship.server is None
        assert "Traceback" not in page.content()
