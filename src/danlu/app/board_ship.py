"""``danlu board``'s last two steps, the logic and the tabs: 4 Try it (base and tuned answer the same
question, as `danlu chat --compare`) and 5 Ship it (`danlu merge`, `danlu export gguf`, `danlu serve`,
each run as the CLI and shown as typed)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from danlu.app import board_config as bc
from danlu.app import board_runs as br
from danlu.app.board_view import L
from danlu.app.common import content_text, port_free
from danlu.errors import UserError


class Ship:
    """The chat engines of the run being tried, and the API server the board started."""

    def __init__(self, procs: br.Processes, folder: Callable[[str], Path]) -> None:
        self.procs = procs
        self.folder = folder  # the runs folder the page names
        self.engines: tuple[Any, Any] | None = None
        self.engine_key: str | None = None
        self.server: tuple[int, int, str] | None = None  # pid, port, command line

    def finished(self, runs: Path, name: str | None) -> br.Run | None:
        return next((r for r in br.scan(runs, self.procs) if r.name == name and r.has_final), None)

    # --------------------------------------------------------------------------- 4 try it

    def engines_for(self, run: br.Run) -> tuple[Any, Any]:
        """(engine, engine) for base and tuned: one engine with the adapter on and off for LoRA
        (as `danlu chat --compare`), two models for full and freeze tuning."""
        from danlu.app.common import base_of_adapter, run_model_section
        from danlu.infer import Engine

        key = str(run.final.resolve())
        if self.engine_key != key:
            self.engines = None  # free the previous run's model first
            base = base_of_adapter(run.final) or run.model
            trust = bool((run_model_section(run.final) or {}).get("trust_remote_code"))  # the run's own
            if run.adapter:
                engine = Engine(base, run.final, trust_remote_code=trust)
                self.engines = (engine, engine)
            else:
                tuned = str(run.final)
                self.engines = (Engine(base, trust_remote_code=trust), Engine(tuned, trust_remote_code=trust))
            self.engine_key = key
        assert self.engines is not None
        return self.engines

    def compare(
        self,
        runs_text: str,
        name: str | None,
        prompt: str,
        base: list,
        tuned: list,
        max_new: int,
        temperature: float,
    ) -> Iterator[tuple[list, list, str, str]]:
        from danlu.infer import GenerationSettings

        runs = self.folder(runs_text)
        run = self.finished(runs, name)
        if run is None or not prompt.strip():
            yield (
                base,
                tuned,
                prompt,
                f"**{L('先选一个训练完成的运行，再输入问题', 'pick a finished run and type a question')}**",
            )
            return
        yield base, tuned, "", f"⏳ {L('加载模型', 'loading')} {run.name}…"
        try:
            engine_base, engine_tuned = self.engines_for(run)
        except UserError as e:
            yield base, tuned, prompt, f"**✗ danlu: error: {e}**"
            return
        settings = GenerationSettings(max_new_tokens=int(max_new), temperature=float(temperature))
        for history, engine, adapter in ((base, engine_base, False), (tuned, engine_tuned, True)):
            messages = [*history, {"role": "user", "content": prompt}]
            history.extend([{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}])
            use = adapter if engine_base is engine_tuned else True
            for piece in engine.stream(
                [{"role": m["role"], "content": m["content"]} for m in messages], settings, use_adapter=use
            ):
                history[-1]["content"] += piece
                yield base, tuned, "", ""
            history[-1]["content"] = history[-1]["content"].strip()
        yield base, tuned, "", f"✓ {run.name}"

    # --------------------------------------------------------------------------- 5 ship it

    def ship(self, runs_text: str, name: str | None, what: str, qtype: str) -> Iterator[str]:
        """Merge (and export GGUF, or GGUF + Ollama Modelfile): each step the CLI command, shown, then
        its output or its one line."""
        runs = self.folder(runs_text)
        run = self.finished(runs, name)
        if run is None:
            yield L("先选一个训练完成的运行", "pick a finished run")
            return
        merged = runs / f"{run.name}-merged"
        steps = []
        if run.adapter and (what == "merge" or not (merged / "config.json").is_file()):
            steps.append(bc.merge_args(run.final, merged))
        if what in ("gguf", "ollama"):
            source = merged if run.adapter else run.final
            steps.append(bc.gguf_args(source, runs / f"{run.name}.{qtype}.gguf", qtype, what))
        if not steps:
            yield (
                L("全量微调的结果已是完整模型", "a full-tuning run's final folder is already a whole model")
                + f": {run.final}"
            )
            return
        lines: list[str] = []
        for args in steps:
            lines.append(f"$ {bc.shown(args)}")
            yield "\n".join([*lines, "…"])
            rc, out, err = br.run_cli(args)
            if rc:
                lines.append(bc.failure(rc, err))
                yield "\n".join(lines)
                return
            lines.append(out.strip())
        yield "\n".join(lines)

    def serve(self, runs_text: str, name: str | None, port: float) -> str:
        runs = self.folder(runs_text)
        run = self.finished(runs, name)
        if run is None:
            return L("先选一个训练完成的运行", "pick a finished run")
        self.stop_server()
        if not port_free("127.0.0.1", int(port)):
            return f"danlu: error: --port {int(port)}: 127.0.0.1:{int(port)} is in use; pick another port"
        args = bc.serve_args(run.name, run.final, int(port), run.adapter)
        log = br.notes(runs, "serve", "log")
        pid = self.procs.start(args, log)
        self.server = (pid, int(port), bc.shown(args))
        deadline = time.time() + 300
        while time.time() < deadline:
            if not self.procs.alive(pid):
                text = log.read_text(encoding="utf-8", errors="replace")
                return f"$ {bc.shown(args)}\n{bc.cli_error(text) or text.strip()[-500:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{int(port)}/health", timeout=2).close()
            except OSError:
                time.sleep(0.5)
                continue
            model = run.name if run.adapter else str(run.final)
            return (
                f"$ {bc.shown(args)}\nOpenAI-compatible API at http://127.0.0.1:{int(port)}/v1 "
                f'(model "{model}")\ncurl -s 127.0.0.1:{int(port)}/v1/chat/completions -H "Content-Type: application/json" '
                f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "你是谁？"}}]}}\''
            )
        return f"$ {bc.shown(args)}\n{L('仍在启动', 'still starting')}: {log}"

    def stop_server(self) -> str:
        if self.server is None:
            return L("没有运行中的服务", "no server running")
        pid, port, _ = self.server
        self.procs.stop(pid)
        self.server = None
        return f"■ {L('已停止服务', 'server stopped')} (port {port})"


def add_tabs(ship: Ship, runs_box: Any) -> None:
    """The Try it and Ship it tabs (inside the page's ``gr.Tabs``); ``runs_box`` holds the runs folder."""
    import gradio as gr

    with gr.Tab(L("④ 试一试", "4 Try it"), id="tab-try") as try_tab:
        try_run = gr.Dropdown([], label=L("训练完成的运行", "finished run"), elem_id="try-run")
        with gr.Row():
            base_chat = gr.Chatbot(label=L("基座模型", "base model"), height=320, elem_id="base-chat")
            tuned_chat = gr.Chatbot(label=L("微调后", "tuned"), height=320, elem_id="tuned-chat")
        with gr.Row():
            prompt = gr.Textbox(
                placeholder="你是谁？ / Who are you?",
                show_label=False,
                elem_id="prompt",
                scale=4,
                max_lines=4,
            )
            ask = gr.Button(L("发送", "Ask both"), variant="primary", elem_id="ask", scale=1)
            clear = gr.Button(L("清空", "Clear"), scale=1)
        try_msg = gr.Markdown(elem_id="try-message")
        with gr.Accordion(L("采样", "sampling"), open=False):
            max_new = gr.Slider(1, 1024, value=64, step=1, label=L("最多生成", "max new tokens"))
            temperature = gr.Slider(
                0, 2, value=0, step=0.05, label=L("温度（0 = 贪心）", "temperature (0 = greedy)")
            )

    with gr.Tab(L("⑤ 发布", "5 Ship it"), id="tab-ship") as ship_tab:
        ship_run = gr.Dropdown([], label=L("训练完成的运行", "finished run"), elem_id="ship-run")
        with gr.Row():
            merge = gr.Button(L("合并", "Merge"), elem_id="merge")
            qtype = gr.Radio(["f16", "q8_0"], value="f16", label="GGUF", elem_id="qtype")
            gguf = gr.Button(L("导出 GGUF", "Export GGUF"), elem_id="gguf")
            ollama = gr.Button(L("导出到 Ollama", "Export for Ollama"), elem_id="ollama")
        with gr.Row():
            port = gr.Number(8000, label=L("端口", "port"), precision=0, elem_id="port")
            serve = gr.Button(L("启动 API 服务", "Start API server"), elem_id="serve")
            stop_serve = gr.Button(L("停止服务", "Stop server"), elem_id="stop-serve")
        ship_log = gr.Code(
            language="shell",
            label=L("运行的命令和输出", "the commands run, and what they printed"),
            elem_id="ship-log",
        )

    def finished(runs_text: str, current: str | None) -> Any:
        names = [r.name for r in br.scan(ship.folder(runs_text), ship.procs) if r.has_final]
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    try_tab.select(finished, [runs_box, try_run], [try_run])
    ship_tab.select(finished, [runs_box, ship_run], [ship_run])

    def compare(
        runs_text: str, name: str | None, text: str, base: list, tuned: list, n: int, t: float
    ) -> Any:
        base = [{"role": m["role"], "content": content_text(m["content"])} for m in base or []]
        tuned = [{"role": m["role"], "content": content_text(m["content"])} for m in tuned or []]
        yield from ship.compare(runs_text, name, text, base, tuned, n, t)

    ask_in = [runs_box, try_run, prompt, base_chat, tuned_chat, max_new, temperature]
    ask_out = [base_chat, tuned_chat, prompt, try_msg]
    ask.click(compare, ask_in, ask_out)
    prompt.submit(compare, ask_in, ask_out)
    clear.click(lambda: ([], [], ""), None, [base_chat, tuned_chat, try_msg])

    def steps(what: str) -> Any:
        def handler(runs_text: str, name: str | None, q: str) -> Any:
            yield from ship.ship(runs_text, name, what, q)

        return handler

    merge.click(steps("merge"), [runs_box, ship_run, qtype], [ship_log])
    gguf.click(steps("gguf"), [runs_box, ship_run, qtype], [ship_log])
    ollama.click(steps("ollama"), [runs_box, ship_run, qtype], [ship_log])
    serve.click(ship.serve, [runs_box, ship_run, port], [ship_log])
    stop_serve.click(ship.stop_server, None, [ship_log])
