"""``danlu board``'s text: the two languages side by side, and what the steps show, as Markdown or
HTML strings built from plain data (testable without Gradio)."""

from __future__ import annotations

import html
from typing import Any

from danlu.app.board_config import Verdict
from danlu.app.board_runs import Run, duration, eta


def L(zh: str, en: str) -> str:
    """One UI text in both languages: Chinese first, then English."""
    return f"{zh} · {en}"


SLOTS = 6  # placeholder fields on the data step
RUN_COLUMNS = ["运行 run", "状态 status", "步数 step", "损失 loss", "模型 model", "更新 updated"]
STATUS = {
    "starting": "启动中 starting",
    "running": "训练中 running",
    "finished": "完成 finished",
    "failed": "失败 failed",
    "stopped": "已停止 stopped",
}


def env_markdown(facts: dict[str, Any]) -> str:
    """`danlu env`'s facts that decide what can be trained here, and what is missing."""
    from danlu.app.env import features

    t = facts["torch"]
    if t["gpus"]:
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in t["gpus"])
        device = f"**GPU:** {gpus}"
    else:
        device = (
            "**"
            + L(
                "没有 GPU：在 CPU 上训练，只适合小模型", "no GPU: training runs on the CPU, small models only"
            )
            + "**"
        )
    lines = [
        device,
        f"**RAM:** {facts['ram_gib']} GiB · **CPU:** {facts['cpu_count']} · **torch:** {t['version']}",
    ]
    missing = [(name, fix) for name, ok, fix in features(facts) if not ok]
    if missing:
        lines.append(L("缺少的功能", "missing features") + ":")
        lines += [f"- {name}: `{fix}`" for name, fix in missing]
    return "\n\n".join(lines[:2]) + ("\n\n" + "\n".join(lines[2:]) if missing else "")


def plan_markdown(command: str, rc: int, out: str, error: str, verdict: Verdict | None) -> str:
    """`danlu plan`'s verdict on top, its table below; a failure is its one line."""
    if rc or verdict is None:
        return f"`{command}`\n\n**✗ {error}**"
    mark = {True: "✓", False: "✗", None: "ℹ"}[verdict.fits]
    head = f"**{mark} {verdict.line}**"
    if verdict.fits is False and verdict.suggestions:
        head += (
            "\n\n"
            + L("可以这样改（选一个，点“应用”）", "to fit, apply one of these")
            + ":\n"
            + "\n".join(f"- `{s}`" for s in verdict.suggestions)
        )
    elif verdict.fits is None:
        head += "\n\n" + L(
            "填写 GPU 显存（例如 16GB）可估算是否放得下", "enter a GPU size (e.g. 16GB) to check a budget"
        )
    return f"{head}\n\n`{command}`\n```\n{out.rstrip()}\n```"


def progress_html(run: Run, seconds_per_step: float | None) -> str:
    """The watched run: status, a progress bar, step of total, ETA, last loss, its one-line error."""
    total = run.total or 0
    pct = f"{100 * run.step / total:.0f}%" if total else ""
    parts = [STATUS.get(run.status, run.status), f"step {run.step}/{total or '?'}", pct]
    left = eta(run.step, run.total, seconds_per_step) if run.status == "running" else None
    if left is not None:
        parts.append(f"ETA {duration(left)}")
    if isinstance(run.loss, int | float):
        parts.append(f"loss {run.loss:.4f}")
    bar = f'<progress value="{run.step}" max="{total or 1}" style="width:100%"></progress>'
    text = " · ".join(p for p in parts if p)
    error = f'<div class="danlu-error"><b>{html.escape(run.message)}</b></div>' if run.message else ""
    return f'<div id="run-progress" data-status="{run.status}" data-step="{run.step}">{bar}<div>{text}</div>{error}</div>'


def samples_html(found: list[tuple[int, list[dict]]]) -> str:
    """The sample answers the run logged, newest first; step 0 is the base model's."""
    if not found:
        return L("训练中会在这里显示样例回答", "sample answers appear here as the run writes them")
    blocks = []
    for step, answers in reversed(found):
        who = L("基座模型", "base model") if step == 0 else f"step {step}"
        items = "".join(
            f"<li><b>{html.escape(str(a.get('prompt', '')))}</b> → {html.escape(str(a.get('answer', '')))}</li>"
            for a in answers
        )
        blocks.append(f'<div class="danlu-sample"><b>{who}</b><ul>{items}</ul></div>')
    return "".join(blocks)


def transcript(commands: list[str], output: str = "") -> str:
    """Commands as typed, then what they printed (a code block)."""
    body = "\n".join(f"$ {c}" for c in commands) + (f"\n{output.rstrip()}" if output else "")
    return f"```\n{body}\n```"
