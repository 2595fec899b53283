"""`danlu web`: a Gradio chat page over :class:`danlu.infer.Engine`.

Streamed replies with Send and Stop (a reasoning model's ``<think>`` block in a collapsible
"Thinking" box above the answer), multi-turn history, a system-prompt box, sampling sliders
(values clamped to what generation takes), and the loaded model and adapter named at the top.
With an adapter: a picker (adapter or bare base) and a Compare tab answering with both side by
side. A request the model refuses (e.g. its template takes no system prompt) shows as one line.
Binds 127.0.0.1 and stays off Gradio's share tunnel unless ``--share`` is given; a password
(``--password-file``, ``DANLU_WEB_PASSWORD``) puts Gradio's login page in front, and listening
beyond this machine without one prints a warning. gradio is
imported inside functions so ``danlu --help`` works without the ``web`` extra.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from danlu.app.common import (
    add_generation_flags,
    add_loading_flags,
    add_model_flags,
    add_password_flags,
    add_thinking_flag,
    content_text,
    exposure_lines,
    loading_options,
    login,
    model_for,
    port_free,
    read_secret,
    settings_from,
    template_kwargs,
    trust_remote_code,
)
from danlu.errors import UserError

if TYPE_CHECKING:
    from danlu.infer import Engine, GenerationSettings

# system fonts only: the default theme fetches Google Fonts, which offline machines cannot reach
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO = ["ui-monospace", "monospace"]


def to_messages(message: str, history: list[dict], system: str) -> list[dict]:
    """The conversation as the engine takes it: optional system prompt, past turns, new message."""
    messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
    for turn in history:
        if (turn.get("metadata") or {}).get("title"):  # a reply's reasoning, shown apart: not said
            continue
        if turn.get("role") in ("user", "assistant"):
            messages.append({"role": turn["role"], "content": content_text(turn.get("content"))})
    messages.append({"role": "user", "content": message})
    return messages


def clamped(defaults: GenerationSettings, temperature: Any, top_p: Any, max_new: Any) -> GenerationSettings:
    """The sliders' values as generation takes them: floats, within range (a slider may send an int)."""
    return replace(
        defaults,
        temperature=min(2.0, max(0.0, float(temperature))),
        top_p=min(1.0, max(0.05, float(top_p))),
        max_new_tokens=min(8192, max(1, int(max_new))),
    )


BASE, TUNED = "base model", "adapter"
THINKING = "Thinking"


def reply_view(reasoning: str, answer: str) -> str | list[dict]:
    """A reply as the chat shows it: the answer, after the reasoning in a collapsible box if any."""
    if not reasoning.strip():
        return answer
    return [
        {"role": "assistant", "content": reasoning.strip(), "metadata": {"title": THINKING}},
        {"role": "assistant", "content": answer},
    ]


async def stream_view(gen: Any) -> AsyncIterator[str | list[dict]]:
    """The reply as it grows, its ``<think>`` block split from the answer (see :func:`reply_view`)."""
    from danlu.infer.reasoning import ReasoningSplitter

    splitter = ReasoningSplitter(gen.reasoning_open)
    reasoning = answer = ""
    async for delta in gen.deltas_async():  # Stop cancels this: the reply stops at the next token
        r, a = splitter.feed(delta.text)
        reasoning, answer = reasoning + r, answer + a
        yield reply_view(reasoning, answer)
    r, a = splitter.flush()
    if r or a:
        yield reply_view(reasoning + r, answer + a)


def build_demo(
    engine: Engine, defaults: GenerationSettings, label: str, template_kwargs: dict | None = None
) -> Any:
    """The Gradio app: a chat tab (ChatInterface, Send and Stop) and, with an adapter, a compare tab."""
    import gradio as gr

    from danlu.errors import UserError
    from danlu.infer import merged

    def start(messages: list[dict], settings: GenerationSettings, use_adapter: bool) -> Any:
        try:
            return engine.start(messages, settings, use_adapter, template_kwargs)
        except UserError as e:  # shown as a one-line message on the page
            raise gr.Error(str(e)) from None

    async def respond(
        message: str,
        history: list[dict],
        system: str,
        temperature: float,
        top_p: float,
        max_new: int,
        which: str = TUNED,
    ) -> AsyncIterator[str | list[dict]]:
        settings = clamped(defaults, temperature, top_p, max_new)
        gen = start(to_messages(message, history, system), settings, which != BASE)
        async for view in stream_view(gen):
            yield view

    async def compare(
        message: str, base: list, tuned: list, system: str, temperature: float, top_p: float, max_new: int
    ) -> AsyncIterator[tuple[str, list, list]]:
        if not message.strip():
            yield message, base, tuned
            return
        settings = clamped(defaults, temperature, top_p, max_new)
        gens: list = []
        try:
            for history, side in ((base, False), (tuned, True)):
                gens.append(start(to_messages(message, history, system), settings, side))
        except gr.Error:
            for g in gens:
                g.stop()
            raise
        sides = [
            [*h, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            for h in (base, tuned)
        ]
        yield "", sides[0], sides[1]
        async for i, delta in merged(gens):  # both decoded together, each streamed into its column
            if delta is not None and delta.text:
                sides[i][-1] = {"role": "assistant", "content": sides[i][-1]["content"] + delta.text}
                yield "", sides[0], sides[1]

    with gr.Blocks(title="丹炉 danlu", analytics_enabled=False) as demo:
        gr.Markdown(f"## danlu chat\n**model:** `{label}`")
        system = gr.Textbox(
            label="System prompt", placeholder="optional; applies to the next message", lines=2
        )
        with gr.Accordion("Sampling", open=False):
            temperature = gr.Slider(
                0, 2, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"
            )
            top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p")
            max_new = gr.Slider(1, 2048, value=defaults.max_new_tokens, step=1, label="Max new tokens")
        extra = [system, temperature, top_p, max_new]
        with gr.Tab("Chat"):
            if engine.has_adapter:
                extra.append(gr.Radio([TUNED, BASE], value=TUNED, label="Answer with", elem_id="which"))
            gr.ChatInterface(
                respond,
                chatbot=gr.Chatbot(label="Chat", height=420),
                textbox=gr.Textbox(
                    placeholder="Type a message and press Enter",
                    show_label=False,
                    elem_id="message",
                    submit_btn="Send",
                    stop_btn="Stop",
                ),
                additional_inputs=extra,
                fill_height=False,
            )
        if engine.has_adapter:
            with gr.Tab("Compare base and adapter"):
                with gr.Row():
                    base = gr.Chatbot(label="base model", height=380, elem_id="base")
                    tuned = gr.Chatbot(label="with the adapter", height=380, elem_id="tuned")
                box = gr.Textbox(
                    placeholder="Ask both and press Enter", show_label=False, elem_id="compare-message"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="compare-send")
                    stop = gr.Button("Stop", elem_id="compare-stop")
                    clear = gr.Button("Clear", elem_id="compare-clear")
                args = ([box, base, tuned, system, temperature, top_p, max_new], [box, base, tuned])
                asked = [send.click(compare, *args), box.submit(compare, *args)]
                stop.click(None, cancels=asked)
                clear.click(lambda: ("", [], []), None, [box, base, tuned], cancels=asked)
    return demo


def run_web(args: argparse.Namespace) -> int:
    try:
        import gradio as gr
    except ImportError:
        raise UserError("danlu web needs gradio: pip install 'danlu[web]'") from None
    from danlu.infer import Engine

    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter}: no such folder; point it at OUTPUT/final of a run")
    if not port_free(args.host, args.port):
        raise UserError(f"--port {args.port}: {args.host}:{args.port} is in use; pick another port")
    password = read_secret(args.password, args.password_file, "DANLU_WEB_PASSWORD", "--password-file")
    model = model_for(args, args.adapter)
    trust = trust_remote_code(args, model, args.adapter)
    engine = Engine(model, args.adapter, trust_remote_code=trust, **loading_options(args))
    label = model + (f" + {args.adapter}" if args.adapter else "")
    demo = build_demo(engine, settings_from(args), label, template_kwargs(args))
    print(f"danlu web — {label}\nopen http://{args.host}:{args.port} in a browser (Ctrl-C stops)", flush=True)
    reach = "chat with this model"
    for line in exposure_lines(args.host, args.share, bool(password), reach, "DANLU_WEB_PASSWORD"):
        print(line, flush=True)
    theme = gr.themes.Default(font=FONTS, font_mono=MONO)
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            quiet=not args.share,  # with --share, gradio prints the public link
            theme=theme,
            footer_links=[],
            **login(password, "danlu web"),
        )
    finally:
        engine.shutdown()  # no decoding thread left running while Python exits
    return 0


def add_parser(sub: Any) -> None:
    """Register `danlu web` on the CLI's subparsers."""
    p = sub.add_parser(
        "web",
        help="chat with a model (and adapter) in the browser (Gradio)",
        description="A local chat page: streamed replies, history, system prompt, sampling sliders.",
    )
    add_model_flags(p, "LoRA adapter folder, e.g. out/identity/final")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--share",
        action="store_true",
        help="also open a public gradio.live link: the page is reachable from anywhere (off by default)",
    )
    add_password_flags(p, "DANLU_WEB_PASSWORD")
    add_thinking_flag(p)
    add_loading_flags(p)
    add_generation_flags(p)
    p.set_defaults(func=run_web)
