"""`danlu web`: the Gradio chat page, driven in a real headless Chromium through Playwright.

Uses Debian's ``chromium`` (apt-get install chromium) instead of Playwright's own browser
download; the browser test is skipped when it is missing. The page serves the tiny random
Llama, whose greedy reply is gibberish but known in advance.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from danlu.app.web import FONTS, MONO, build_demo, to_messages  # noqa: E402
from danlu.infer import Engine, GenerationSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GREEDY = GenerationSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0)


def test_history_and_system_prompt_become_engine_messages():
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
    ]
    assert to_messages("again", history, "  be brief ") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert to_messages("x", [], "") == [{"role": "user", "content": "x"}]


@contextmanager
def serving(engine: Engine, label: str) -> Iterator[str]:
    """Launch the page on a free localhost port in this process; yield its URL."""
    demo = build_demo(engine, GREEDY, label=label)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    theme = gr.themes.Default(font=FONTS, font_mono=MONO)
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        theme=theme,
        footer_links=[],
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextmanager
def browser_page(url: str) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            yield page
        finally:
            browser.close()


def send(page: Any, text: str) -> None:
    from playwright.sync_api import expect

    box = page.locator("#message textarea, #message input").first
    expect(box).to_be_editable(timeout=60_000)
    box.fill(text)
    box.press("Enter")


def _loose(text: str) -> re.Pattern:
    """Match the rendered reply, ignoring whitespace differences Markdown rendering makes."""
    return re.compile(r"\s*" + r"\s*".join(re.escape(w) for w in text.split()) + r"\s*")


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason="needs Debian's chromium: apt-get install -y chromium"
)


@needs_chromium
def test_page_shows_replies_and_keeps_history(tiny_model_dir, tmp_path):
    from playwright.sync_api import expect

    engine = Engine(str(tiny_model_dir), precision="fp32")
    first = [{"role": "user", "content": "Hello there"}]
    expected = engine.reply(first, GREEDY)
    second = [*first, {"role": "assistant", "content": expected}, {"role": "user", "content": "And then?"}]
    expected_second = engine.reply(second, GREEDY)  # the page must send the history back
    with serving(engine, "tiny test model") as url, browser_page(url) as page:
        expect(page.get_by_text("tiny test model")).to_be_visible(timeout=60_000)
        bot = page.locator("[data-testid='bot']")
        send(page, "Hello there")
        expect(bot.first).to_have_text(_loose(expected), timeout=60_000)
        send(page, "And then?")
        expect(bot.nth(1)).to_have_text(_loose(expected_second), timeout=60_000)
        page.screenshot(path=str(tmp_path / "web.png"))


@needs_chromium
@pytest.mark.slow
def test_real_model_streams_into_the_page_and_saves_the_screenshot(tmp_path):
    """The reply grows token by token in the browser; the final page is saved as a screenshot (to
    docs/web.png, the README's picture, with DANLU_UPDATE_DOCS=1; else into the test's folder)."""
    from playwright.sync_api import expect

    engine = Engine("smollm2-135m-instruct", precision="fp32")
    question = "What is the capital of France?"
    system = "You are a geography teacher. Answer in one sentence."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    expected = engine.reply(messages, GREEDY)
    assert "Paris" in expected
    with serving(engine, "smollm2-135m-instruct") as url, browser_page(url) as page:
        page.get_by_label("System prompt").fill(system)
        send(page, question)
        bot = page.locator("[data-testid='bot']").first
        seen: list[str] = []
        deadline = time.time() + 120
        while not _loose(expected).fullmatch(seen[-1] if seen else "") and time.time() < deadline:
            text = bot.inner_text(timeout=60_000) if bot.count() else ""
            if text.strip() and (not seen or text != seen[-1]):
                seen.append(text)
            time.sleep(0.02)
        expect(bot).to_have_text(_loose(expected))
        assert len(seen) >= 2, seen  # partial replies were on screen before the whole one
        expect(page.locator("#message textarea, #message input").first).to_be_editable(timeout=60_000)
        page.wait_for_timeout(500)  # let the progress indicator fade
        folder = ROOT / "docs" if os.environ.get("DANLU_UPDATE_DOCS") == "1" else tmp_path
        folder.mkdir(exist_ok=True)
        page.screenshot(path=str(folder / "web.png"))
        assert (folder / "web.png").stat().st_size > 10_000
