"""`danlu board`: the whole journey in the browser (Gradio), in five steps.

1 Model: what `danlu env` and `danlu plan` say about it. 2 Data: `danlu data stats / preview`'s
verdict, histogram and marked text; placeholders in a form. 3 Train: a preset, the few settings
beginners change and the whole YAML; `danlu train` started as a separate process, watched through
its metrics.jsonl. 4 Try it: base and tuned on the same prompt. 5 Ship it: merge, GGUF, API server.
Every command is the CLI's, run as ``python -m danlu ...`` and shown as typed; its errors are its
one line. This file holds what the page's buttons do; the page itself is :mod:`danlu.app.board_page`,
its logic (plain Python, tested without a browser) :mod:`danlu.app.board_config` and
:mod:`danlu.app.board_runs`. gradio and torch are imported inside functions: ``danlu --help`` stays light.
"""

from __future__ import annotations

import argparse
import html
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from danlu.app import board_config as bc
from danlu.app import board_runs as br
from danlu.app.board_ship import Ship
from danlu.app.board_view import (
    SLOTS,
    L,
    env_markdown,
    plan_markdown,
    progress_html,
    samples_html,
    transcript,
)
from danlu.app.common import add_password_flags, exposure_lines, login, port_free, read_secret
from danlu.config import CONFIG_FILENAME
from danlu.errors import UserError

# system fonts only: the default theme fetches Google Fonts, which offline machines cannot reach
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO = ["ui-monospace", "monospace"]
CSS = """
mark.trained { background: #bbf7d0; color: inherit; }
.danlu-preview { white-space: pre-wrap; font-size: 0.85em; max-height: 420px; overflow: auto; }
.danlu-sample { margin-bottom: 0.6em; }
"""


class Board:
    """What the page's buttons do, with the state every browser tab shares: the processes the board
    started, the pace of the runs it watches, the chat engines and the API server (:class:`Ship`)."""

    def __init__(self, runs: Path) -> None:
        self.runs = runs
        self.procs = br.Processes()
        self.pace = br.Pace()
        self.work = Path(tempfile.mkdtemp(prefix="danlu-board-"))
        self.ship = Ship(self.procs, self.folder)  # steps 4 and 5

    def close(self) -> None:
        """Stop the API server the board started and drop its scratch files; training runs go on."""
        self.ship.stop_server()
        shutil.rmtree(self.work, ignore_errors=True)

    def folder(self, runs_text: str) -> Path:
        return Path(runs_text.strip() or str(self.runs)).expanduser()

    # ------------------------------------------------------------------------- 1 model

    def check_model(self, model: str, gpu_mem: str, text: str) -> tuple[str, str, str, Any]:
        """(environment summary, `danlu env` in full, the plan and its verdict, suggestions)."""
        import gradio as gr

        from danlu.app.env import collect, render

        facts = collect()
        try:
            cfg = bc.put(bc.parse(text), "model.path", model.strip() or bc.default("model.path"))
        except UserError as e:
            return env_markdown(facts), render(facts), f"**✗ {e}**", gr.update(choices=[], value=None)
        config = self.work / f"plan-{time.time_ns()}.yaml"
        config.write_text(bc.dump(cfg), encoding="utf-8")
        args = bc.plan_args(config, gpu_mem)
        rc, out, err = br.run_cli(args, timeout=300)
        verdict = bc.plan_verdict(out) if rc == 0 else None
        options = verdict.suggestions if verdict and verdict.fits is False else []
        shown = bc.shown(args).replace(str(config), "CONFIG")
        md = plan_markdown(shown, rc, out, bc.failure(rc, err), verdict)
        return (
            env_markdown(facts),
            render(facts),
            md,
            gr.update(choices=options, value=options[0] if options else None),
        )

    # -------------------------------------------------------------------------- 2 data

    def data_changed(self, paths_text: str, text: str) -> list[Any]:
        """The placeholder fields for the ``{{keys}}`` the data files use, filled from the config."""
        import gradio as gr

        paths = [p for p in bc.data_paths(paths_text) if Path(p).exists()]
        keys = bc.placeholders_in(paths)[:SLOTS]
        try:
            values = bc.get(bc.parse(text), "data.placeholders", {}) or {}
        except UserError:
            values = {}
        slots = [
            gr.update(visible=True, label=f"{{{{{k}}}}}", value=str(values.get(k, "")))
            if i < len(keys)
            else gr.update(visible=False, value="")
            for i, k in enumerate(keys + [""] * (SLOTS - len(keys)))
        ]
        return [keys, *slots]

    def upload(self, files: list[str] | None, runs_text: str) -> Any:
        """Uploaded files are copied to RUNS/data/ (a training process outlives Gradio's temp files)."""
        import gradio as gr

        if not files:
            return gr.skip()
        dest = self.folder(runs_text) / "data"
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for f in files:
            target = dest / Path(f).name
            shutil.copy(f, target)
            paths.append(str(target.resolve()))
        return "\n".join(paths)

    def check_data(self, paths_text: str, text: str) -> Iterator[tuple[str, str, Any, str]]:
        """`danlu data stats` (verdict, statistics, histogram) and `danlu data preview`, side by side."""
        paths = bc.data_paths(paths_text)
        if not paths:
            yield f"**✗ {L('先选择数据文件', 'choose a data file first')}**", "", None, ""
            return
        try:
            cfg = bc.parse(text)
        except UserError as e:
            yield f"**✗ {e}**", "", None, ""
            return
        png = self.work / f"lengths-{time.time_ns()}.png"
        stats = (  # stats (and its histogram) reads SFT data; preference data gets its objective's check
            bc.data_args("stats", paths, cfg, "--out", str(png))
            if bc.objective_of(cfg) == "sft"
            else bc.data_args("check", paths, cfg)
        )
        preview = bc.data_args("preview", paths, cfg, "--plain", "-n", "3")
        yield f"⏳ {L('检查中', 'checking')}…", transcript([bc.shown(stats), bc.shown(preview)]), None, ""
        running = [br.start_cli(stats), br.start_cli(preview)]  # both at once: two tokenizer loads
        (s_out, s_err), (p_out, p_err) = (p.communicate(timeout=600) for p in running)
        if running[0].returncode:
            error = bc.failure(running[0].returncode, s_err)
            yield f"**✗ {error}**", transcript([bc.shown(stats)], error), None, ""
            return
        problems = [line.split("problem:", 1)[1].strip() for line in s_out.splitlines() if "problem:" in line]
        verdict = (
            f"**⚠ {L('有问题', 'problems')}:** " + "; ".join(problems)
            if problems
            else f"**✓ {L('数据可以训练', 'ready to train')}**"
        )
        report = "\n".join(line for line in s_out.splitlines() if not line.startswith("wrote "))
        rc = running[1].returncode
        marked = bc.preview_html(p_out) if rc == 0 else f"<b>{html.escape(bc.failure(rc, p_err))}</b>"
        histogram = str(png) if png.is_file() else None
        yield verdict, transcript([bc.shown(stats), bc.shown(preview)], report), histogram, marked

    # --------------------------------------------------------------------------- 3 train

    def start(
        self, text: str, runs_text: str, name: str, resume_name: str | None = None
    ) -> tuple[str, Any, str]:
        """Start `danlu train` (or `--resume`) in its own process; (message, watched run, next name)."""
        import gradio as gr

        runs = self.folder(runs_text)
        try:
            if resume_name:
                pid = self.procs.pid_of(runs, resume_name)
                if pid is not None and self.procs.alive(pid):
                    raise UserError(f"{resume_name} is running already")
                own = runs / f"{resume_name}.yaml"
                config = own if own.is_file() else runs / resume_name / CONFIG_FILENAME
                name = resume_name
            else:
                config = bc.write_run_config(text, runs, name)
                self.refuse_if_too_big(config)
        except UserError as e:
            return f"**✗ {e}**", gr.skip(), gr.skip()
        args = bc.train_args(config, resume=bool(resume_name))
        log = br.notes(runs, name, "log")
        self.procs.start(args, log, br.notes(runs, name, "pid"), append=bool(resume_name))
        return (
            f"▶ `{bc.shown(args)}`",
            gr.update(choices=self.names(runs), value=name),
            bc.next_name(runs, name),
        )

    def gpu_budget(self) -> str | None:
        """This machine's GPU memory as `danlu plan --gpu-mem` takes it; None without a GPU."""
        import torch

        if not torch.cuda.is_available():
            return None
        return f"{torch.cuda.mem_get_info()[1] / 2**30:.2f}GiB"

    def refuse_if_too_big(self, config: Path) -> None:
        """On a GPU, a run `danlu plan` says will not fit is refused before it starts."""
        budget = self.gpu_budget()
        if budget is None:
            return
        rc, out, _ = br.run_cli(bc.plan_args(config, budget), timeout=300)
        verdict = bc.plan_verdict(out) if rc == 0 else None
        if verdict and verdict.fits is False:
            config.unlink()
            fix = f"; {L('可改为', 'to fit')}: {verdict.suggestions[0]}" if verdict.suggestions else ""
            raise UserError(verdict.line + fix)

    def stop(self, runs_text: str, name: str | None) -> str:
        runs = self.folder(runs_text)
        pid = self.procs.pid_of(runs, name) if name else None
        if pid is None or not self.procs.stop(pid):
            return f"**{L('没有在运行', 'not running')}:** {name or '-'}"
        return f"■ {L('已停止', 'stopped')} {name}"

    def names(self, runs: Path, finished: bool = False) -> list[str]:
        return [r.name for r in br.scan(runs, self.procs) if r.has_final or not finished]

    def refresh(self, runs_text: str, watched: str | None, seen: dict) -> list[Any]:
        """The timer's tick: runs table, the watched run's progress, curves, samples and log; only
        what changed since the last tick (``seen``) is sent."""
        import gradio as gr
        import pandas as pd

        runs = self.folder(runs_text)
        found = br.scan(runs, self.procs)
        names = [r.name for r in found]
        if watched not in names:
            watched = names[0] if names else None  # a new run, or the newest when none was picked
        run = next((r for r in found if r.name == watched), None)
        now: dict[str, Any] = {"rows": br.table(found), "names": names, "watched": watched}
        now.update(progress="", loss=[], lr=[], samples="", log="")
        if run is not None:
            if run.status == "running":
                self.pace.observe(str(run.folder), run.step, time.time())
            rows = br.read_metrics(run.folder / br.METRICS)
            now["loss"], now["lr"] = br.curves(rows)
            now["progress"] = progress_html(run, self.pace.seconds_per_step(str(run.folder)))
            now["samples"] = samples_html(br.samples(rows))
            now["log"] = br.log_tail(runs, run.name)
        fresh = {k: seen.get(k) != v for k, v in now.items()}

        def out(key: str, value: Any) -> Any:
            return value if fresh[key] else gr.skip()

        choices = gr.update(choices=names, value=watched) if fresh["names"] or fresh["watched"] else gr.skip()
        return [
            out("rows", gr.update(value=now["rows"] or None)),
            choices,
            out("progress", now["progress"]),
            out("loss", pd.DataFrame(now["loss"]) if now["loss"] else None),
            out("lr", pd.DataFrame(now["lr"]) if now["lr"] else None),
            out("samples", now["samples"]),
            out("log", now["log"]),
            now,
        ]


def build_board(board: Board) -> Any:
    from danlu.app.board_page import build_page

    return build_page(board)


def launch(
    demo: Any,
    host: str,
    port: int,
    share: bool,
    board: Board,
    block: bool = True,
    password: str | None = None,
) -> None:
    import gradio as gr

    demo.launch(
        **login(password, "danlu board"),
        server_name=host,
        server_port=port,
        share=share,
        quiet=not share,  # with --share, gradio prints the public link
        prevent_thread_lock=not block,
        theme=gr.themes.Default(font=FONTS, font_mono=MONO),
        css=CSS,
        footer_links=[],
        allowed_paths=[str(board.work)],
    )


def run_board(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("danlu board needs gradio: pip install 'danlu[web]'") from None
    if not port_free(args.host, args.port):
        raise UserError(f"--port {args.port}: {args.host}:{args.port} is in use; pick another port")
    password = read_secret(args.password, args.password_file, "DANLU_BOARD_PASSWORD", "--password-file")
    board = Board(Path(args.runs))
    demo = build_board(board)
    print(
        f"danlu board — runs in {args.runs}/\nopen http://{args.host}:{args.port} in a browser "
        "(Ctrl-C stops the board; training runs keep going)",
        flush=True,
    )
    reach = "start training runs and servers on this machine"
    for line in exposure_lines(args.host, args.share, bool(password), reach, "DANLU_BOARD_PASSWORD"):
        print(line, flush=True)
    try:
        launch(demo, args.host, args.port, args.share, board, password=password)
    finally:
        board.close()
    return 0


def add_parser(sub: Any) -> None:
    """Register `danlu board` on the CLI's subparsers."""
    p = sub.add_parser(
        "board",
        help="the whole journey in the browser: model, data, train, try, ship (Gradio)",
        description="A local page that walks through choosing a model, checking data, training "
        "(with live loss and sample answers), comparing base and tuned, and merging / exporting / "
        "serving. Every step runs the danlu command it shows.",
    )
    p.add_argument(
        "--runs", default="out", help="folder where runs are written and looked for (default: out)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument(
        "--share",
        action="store_true",
        help="also open a public gradio.live link; anyone with it can start runs here (off by default)",
    )
    add_password_flags(p, "DANLU_BOARD_PASSWORD")
    p.set_defaults(func=run_board)
