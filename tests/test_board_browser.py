"""`danlu board` in headless Chromium (Debian's package, through Playwright, as tests/test_web.py
does; skipped without it).

The board is served in this process on a free port; the commands it runs are real ``python -m
danlu`` processes. The journey trains the tiny random Llama for a few steps on the CPU (with
``DANLU_UPDATE_DOCS=1``: the embedded default model for 30 steps, and the screenshots go to docs/
instead of the test's folder).
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

ROOT = Path(__file__).resolve().parent.parent
IDENTITY = bc.PRESETS / "identity.json"


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
