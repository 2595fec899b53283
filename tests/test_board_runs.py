"""`danlu board`'s runs: metrics read into curves, samples and progress, statuses and ETAs, runs
started in a terminal or by the board, and the board's own ``python -m danlu train`` processes
(a mistake is the CLI's one line; stop, then resume from the latest checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from danlu.app import board_config as bc
from danlu.app import board_runs as br
from danlu.app.board_view import progress_html, samples_html

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
    # long enough to be stopped midway: the tiny model trains 500 steps in ~20 s on a quiet CPU
    for key, value in {"train.max_steps": 20_000, "train.save_every": 2, "train.eval_prompts": []}.items():
        cfg = bc.put(cfg, key, value)
    try:
        message, _, name_after = board.start(bc.dump(cfg), str(runs), "long")
        assert message == f"▶ `danlu train {runs}/long.yaml --no-progress`" and name_after == "long-2"
        # checkpoint-4 or a later one (older checkpoints are pruned as new ones come)
        wait_for(
            lambda: any(int(c.name.split("-")[1]) >= 4 for c in (runs / "long").glob("checkpoint-*")), 180
        )
        (run,) = br.scan(runs, board.procs)
        assert run.status == "running" and run.total == 20_000
        assert board.stop(str(runs), "long") == "■ 已停止 · stopped long"
        (run,) = br.scan(runs, board.procs)
        assert run.status == "stopped" and 4 <= run.step < 20_000, run
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
