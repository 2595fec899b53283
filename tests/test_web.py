"""`danlu web`: the Gradio chat page, driven in a real headless Chromium through Playwright.

Uses Debian's ``chromium`` (apt-get install chromium) instead of Playwright's own browser
download; the browser test is skipped when it is missing. The page serves the tiny random
Llama, whose greedy reply is gibberish but known in advance.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from browser import CHROMIUM
from browser import browser_page as page_at

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from danlu.app.web import FONTS, MONO, build_demo, clamped, to_messages  # noqa: E402
from danlu.infer import Engine, GenerationSettings  # noqa: E402
from danlu.infer.batch import wait_idle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
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
    thought = {"role": "assistant", "content": "let me think", "metadata": {"title": "Thinking"}}
    answer = {"role": "assistant", "content": "hello", "metadata": None}
    assert to_messages("x", [history[0], thought, answer], "")[1:] == [
        {"role": "assistant", "content": "hello"},  # the reasoning shown on the page is not said again
        {"role": "user", "content": "x"},
    ]


@pytest.mark.parametrize("inside", [False, True])
def test_a_reasoning_reply_shows_its_thinking_apart_from_the_answer(inside):
    import asyncio

    from danlu.app.web import THINKING, stream_view
    from danlu.infer import Delta, Generation

    def scripted(text: str, open_: bool = False) -> Generation:
        gen = Generation(prompt_tokens=3)
        gen.reasoning_open = open_
        for i in range(0, len(text), 2):
            gen._push(Delta(text[i : i + 2]))
        gen._finish("stop")
        return gen

    async def views(gen: Generation) -> list:
        return [v async for v in stream_view(gen)]

    text = ("" if inside else "<think>\n") + "Greeting: answer in kind.\n</think>\n\nHello! 你好"
    shown = asyncio.run(views(scripted(text, inside)))
    assert shown[-1] == [
        {"role": "assistant", "content": "Greeting: answer in kind.", "metadata": {"title": THINKING}},
        {"role": "assistant", "content": "Hello! 你好"},
    ]
    assert not any("<think>" in str(v) or "</think>" in str(v) for v in shown)
    assert asyncio.run(views(scripted("<think>\n\n</think>\n\nJust this.")))[-1] == "Just this."
    assert asyncio.run(views(scripted("No block.")))[-1] == "No block."


def test_sliders_reach_generation_as_floats_within_range():
    """A slider may send an int (temperature 2): generation gets 2.0, and values out of range are
    brought back into it."""
    s = clamped(GREEDY, 2, 0, 0)
    assert (s.temperature, s.top_p, s.max_new_tokens) == (2.0, 0.05, 1) and type(s.temperature) is float
    s = clamped(GREEDY, 9, 3, 10**9)
    assert (s.temperature, s.top_p, s.max_new_tokens) == (2.0, 1.0, 8192)


@contextmanager
def serving(engine: Engine, label: str, defaults: GenerationSettings = GREEDY) -> Iterator[str]:
    """Launch the page on a free localhost port in this process; yield its URL."""
    demo = build_demo(engine, defaults, label=label)
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


def browser_page(url: str) -> Iterator[Any]:
    return page_at(url, 1100, 900)


def send(page: Any, text: str, button: bool = False) -> None:
    """Type ``text`` into the chat box; press Enter, or click Send."""
    from playwright.sync_api import expect

    box = page.locator("#message textarea, #message input").first
    expect(box).to_be_editable(timeout=60_000)
    box.fill(text)
    if button:
        page.locator("#message").get_by_role("button", name="Send").click()
    else:
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


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from server_helpers import make_adapter

    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("web") / "a", seed=1)


@needs_chromium
def test_send_and_stop_buttons_stop_the_model(tiny_model_dir):
    """Send starts a reply; Stop ends it at the next token (the model is slowed to 0.05 s a token,
    so the 400-token reply would run 20 s), and the page takes the next message."""
    from playwright.sync_api import expect

    engine = Engine(str(tiny_model_dir), precision="fp32")
    engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    long = GenerationSettings(max_new_tokens=400, temperature=0, repetition_penalty=1.0)
    with serving(engine, "tiny test model", long) as url, browser_page(url) as page:
        send(page, "Hello there", button=True)
        bot = page.locator("[data-testid='bot']").first
        expect(bot).not_to_have_text(re.compile(r"^\s*$"), timeout=60_000)
        page.locator("#message").get_by_role("button", name="Stop").click()
        stopped = time.monotonic()
        assert wait_idle(engine.batcher, 5), "the reply kept generating"
        assert time.monotonic() - stopped < 3
        shown = bot.inner_text()
        page.wait_for_timeout(500)
        assert bot.inner_text() == shown  # nothing more arrives
        send(page, "And then?")
        expect(page.locator("[data-testid='bot']").nth(1)).not_to_have_text(
            re.compile(r"^\s*$"), timeout=60_000
        )


@needs_chromium
def test_temperature_two_on_the_slider_answers(tiny_model_dir):
    from playwright.sync_api import expect

    engine = Engine(str(tiny_model_dir), precision="fp32")
    with serving(engine, "tiny test model") as url, browser_page(url) as page:
        page.get_by_text("Sampling").click()
        number = page.get_by_label("number input for Temperature (0 = greedy)")
        number.fill("2")
        number.press("Enter")
        send(page, "Hello there")
        expect(page.locator("[data-testid='bot']").first).not_to_have_text(
            re.compile(r"^\s*$"), timeout=60_000
        )
        assert not page.get_by_text("Error").count()


@needs_chromium
def test_compare_tab_answers_with_base_and_adapter_side_by_side(tiny_model_dir, adapter_dir):
    from playwright.sync_api import expect

    engine = Engine(str(tiny_model_dir), adapter_dir, precision="fp32")
    question = [{"role": "user", "content": "Hello there"}]
    base, tuned = engine.reply(question, GREEDY, use_adapter=False), engine.reply(question, GREEDY)
    assert base != tuned
    with serving(engine, "tiny + adapter") as url, browser_page(url) as page:
        page.get_by_role("tab", name="Compare base and adapter").click()
        box = page.locator("#compare-message textarea").first
        expect(box).to_be_editable(timeout=60_000)
        box.fill("Hello there")
        page.locator("#compare-send").click()
        expect(page.locator("#base [data-testid='bot']").first).to_have_text(_loose(base), timeout=60_000)
        expect(page.locator("#tuned [data-testid='bot']").first).to_have_text(_loose(tuned), timeout=60_000)
        # the chat tab's picker answers with the bare base
        page.get_by_role("tab", name="Chat").click()
        page.locator("#which").get_by_text("base model").click()
        send(page, "Hello there")
        expect(page.locator("[data-testid='bot']").first).to_have_text(_loose(base), timeout=60_000)


@needs_chromium
def test_a_conversation_the_template_refuses_shows_one_line(tiny_model_dir, tmp_path):
    from playwright.sync_api import expect
    from transformers import AutoTokenizer

    from server_helpers import TOOL_TEMPLATE, make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE  # raises on a system message
    tokenizer.save_pretrained(adapter)
    engine = Engine(str(tiny_model_dir), adapter, precision="fp32")
    with serving(engine, "tiny") as url, browser_page(url) as page:
        page.get_by_label("System prompt").fill("Be brief.")
        send(page, "Hello there")
        expect(
            page.get_by_text(re.compile("cannot render this conversation.*no system messages here"))
        ).to_be_visible(timeout=60_000)
