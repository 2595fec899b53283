"""``danlu board``'s runs: what `danlu train` wrote, read back, and the processes the board starts.

A run is a folder holding ``danlu_config.yaml`` and ``metrics.jsonl``, whoever started it (the
board or a terminal). The board keeps its own notes on the runs it launched in ``RUNS/.board/``:
``NAME.log`` (the command's output) and ``NAME.pid``. Everything here is plain Python over files
and processes, testable without a browser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from danlu.app.board_config import cli_error, get, shown
from danlu.config import CONFIG_FILENAME

METRICS = "metrics.jsonl"  # danlu.tracking.METRICS (not imported: that module loads torch)
NOTES = ".board"
STALE_S = 120  # a run nobody here started counts as running while its metrics changed this recently


# ------------------------------------------------------------------------------ metrics


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a half-written last line (the run is writing it) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def curves(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Plot points: (loss and eval loss, learning rate), each ``{"step", "value", "series"}``."""
    loss = [
        {"step": r["step"], "value": r[key], "series": name}
        for r in rows
        for key, name in (("loss", "train loss"), ("eval_loss", "eval loss"))
        if isinstance(r.get(key), int | float)
    ]
    lr = [{"step": r["step"], "value": r["lr"], "series": "learning rate"} for r in rows if "lr" in r]
    return loss, lr


def samples(rows: list[dict]) -> list[tuple[int, list[dict]]]:
    """``(step, [{"prompt", "answer"}, ...])`` for every sample row, in order."""
    return [(r["step"], r["samples"]) for r in rows if isinstance(r.get("samples"), list)]


def last(rows: list[dict], key: str) -> Any:
    return next((r[key] for r in reversed(rows) if key in r), None)


def total_steps(cfg: dict, summary: dict | None) -> int | None:
    """The run's optimizer steps, as `danlu train` counts them (train.plan_steps, one process)."""
    if get(cfg, "train.max_steps"):
        return int(get(cfg, "train.max_steps"))
    if not summary:
        return None  # epochs: the sample count is known once the data is read
    n = summary.get("packed_rows") or summary.get("samples") or 0
    batch, accum = int(get(cfg, "train.batch_size", 4)), int(get(cfg, "train.grad_accum", 1))
    per_epoch = math.ceil(math.ceil(n / batch) / accum)
    return max(1, math.ceil(float(get(cfg, "train.epochs", 3.0)) * per_epoch))


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta(step: int, total: int | None, seconds_per_step: float | None) -> float | None:
    if not total or seconds_per_step is None or step >= total:
        return None
    return (total - step) * seconds_per_step


class Pace:
    """Seconds per step of running runs, from when the board saw their steps change."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, int]] = {}
        self.latest: dict[str, tuple[float, int]] = {}

    def observe(self, key: str, step: int, now: float) -> None:
        if key not in self.first or step < self.first[key][1]:
            self.first[key] = (now, step)
        if key not in self.latest or step != self.latest[key][1]:
            self.latest[key] = (now, step)

    def seconds_per_step(self, key: str) -> float | None:
        if key not in self.first or key not in self.latest:
            return None
        (t0, s0), (t1, s1) = self.first[key], self.latest[key]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None


# --------------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    """One run as the board lists it."""

    name: str
    folder: Path
    status: str  # starting, running, finished, failed, stopped
    message: str  # the one-line reason for failed / stopped
    step: int
    total: int | None
    loss: float | None
    model: str
    method: str
    updated: float  # newest file time

    @property
    def final(self) -> Path:
        return self.folder / "final"

    @property
    def has_final(self) -> bool:
        return has_final(self.folder)

    @property
    def adapter(self) -> bool:
        return (self.final / "adapter_config.json").is_file()


def has_final(folder: Path) -> bool:
    """Whether the run saved its result: an adapter, or (full, freeze) a whole model."""
    return (folder / "final" / "adapter_config.json").is_file() or (
        folder / "final" / "config.json"
    ).is_file()


def notes(runs: Path, name: str, kind: str) -> Path:
    return runs / NOTES / f"{name}.{kind}"


def log_tail(runs: Path, name: str, lines: int = 40) -> str:
    try:
        text = notes(runs, name, "log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def status(alive: bool, launched: bool, has_final: bool, log: str, age: float | None) -> tuple[str, str]:
    """(status, one-line message) of a run.

    ``alive``: its board-started process is running; ``launched``: the board started it (so its
    process is known); ``age``: seconds since its metrics or config last changed (None: not yet)."""
    if alive:
        return ("running" if age is not None else "starting"), ""
    if has_final:
        return "finished", ""
    error = cli_error(log.rpartition("\n$ danlu ")[2])  # the last command's output: a resume starts afresh
    if error:
        return "failed", error
    if launched:
        return "stopped", ""
    if age is not None and age < STALE_S:
        return "running", "started outside the board"
    return "stopped", ""


def _mtime(*paths: Path) -> float | None:
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return max(times) if times else None


def read_run(runs: Path, name: str, procs: Processes, now: float | None = None) -> Run:
    folder = runs / name
    now = time.time() if now is None else now
    config = folder / CONFIG_FILENAME
    cfg: dict = {}
    if config.is_file():
        with contextlib.suppress(OSError, yaml.YAMLError):
            cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    if not cfg and (runs / f"{name}.yaml").is_file():  # launched by the board, still loading
        with contextlib.suppress(OSError, yaml.YAMLError):
            cfg = yaml.safe_load((runs / f"{name}.yaml").read_text(encoding="utf-8")) or {}
    summary = None
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((folder / "data_summary.json").read_text(encoding="utf-8"))
    rows = read_metrics(folder / METRICS)
    changed = _mtime(config, folder / METRICS)
    pid = procs.pid_of(runs, name)
    state, message = status(
        pid is not None and procs.alive(pid),
        pid is not None,
        has_final(folder),
        log_tail(runs, name),
        None if changed is None else now - changed,
    )
    newest = _mtime(config, folder / METRICS, notes(runs, name, "log")) or 0.0
    return Run(
        name=name,
        folder=folder,
        status=state,
        message=message,
        step=max((r["step"] for r in rows), default=0),
        total=total_steps(cfg, summary),
        loss=last(rows, "loss"),
        model=str(get(cfg, "model.path", "")),
        method=str(get(cfg, "train.method", "lora")),
        updated=newest,
    )


def scan(runs: Path, procs: Processes) -> list[Run]:
    """Every run in ``runs``: folders with a danlu_config.yaml, and runs the board launched that
    have not written one yet (loading, or failed before). Newest first."""
    if not runs.is_dir():
        return []
    names = {p.parent.name for p in runs.glob(f"*/{CONFIG_FILENAME}")}
    names |= {p.stem for p in (runs / NOTES).glob("*.log") if (runs / f"{p.stem}.yaml").is_file()}
    found = [read_run(runs, name, procs) for name in names]
    return sorted(found, key=lambda r: r.updated, reverse=True)


def table(found: list[Run]) -> list[list[Any]]:
    """Rows for the runs table: name, status, progress, loss, model, when."""
    rows = []
    for r in found:
        progress = f"{r.step}/{r.total}" if r.total else str(r.step)
        loss = f"{r.loss:.4f}" if isinstance(r.loss, int | float) else ""
        when = time.strftime("%m-%d %H:%M", time.localtime(r.updated)) if r.updated else ""
        rows.append(
            [r.name, r.status + (f": {r.message}" if r.message else ""), progress, loss, r.model, when]
        )
    return rows


# ---------------------------------------------------------------------------- processes


class Processes:
    """The commands the board starts, each in its own session so that it outlives the board.

    Known by pid files in ``RUNS/.board``, so a board started later still sees and stops them."""

    def __init__(self) -> None:
        self.children: dict[int, subprocess.Popen] = {}

    def start(self, args: list[str], log: Path, pid_file: Path | None = None, append: bool = False) -> int:
        """``python -m danlu ARGS`` in the background, output to (or, ``append``, after) ``log``; its pid."""
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "a" if append else "w", encoding="utf-8") as out:
            out.write(f"$ {shown(args)}\n")  # each command's output starts with its command line
            out.flush()
            child = subprocess.Popen(
                [sys.executable, "-m", "danlu", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C on the board does not reach it
            )
        self.children[child.pid] = child
        if pid_file is not None:
            pid_file.write_text(str(child.pid), encoding="ascii")
        return child.pid

    def pid_of(self, runs: Path, name: str) -> int | None:
        try:
            return int(notes(runs, name, "pid").read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def alive(self, pid: int) -> bool:
        child = self.children.get(pid)
        if child is not None:
            return child.poll() is None  # also reaps it once it ended
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        cmdline = Path(f"/proc/{pid}/cmdline")  # a recycled pid is not our run
        return not cmdline.exists() or b"danlu" in cmdline.read_bytes()

    def stop(self, pid: int) -> bool:
        """Terminate the process (its whole session); False when it was not running."""
        if not self.alive(pid):
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        child = self.children.get(pid)
        if child is not None:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                child.wait()
        return True

    def stop_all(self) -> None:
        for pid in list(self.children):
            self.stop(pid)


def run_cli(args: list[str], timeout: float = 600) -> tuple[int, str, str]:
    """``python -m danlu ARGS`` to the end: (exit code, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "danlu", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return done.returncode, done.stdout, done.stderr


def start_cli(args: list[str]) -> subprocess.Popen:
    """``python -m danlu ARGS`` started, output captured (for several at once)."""
    return subprocess.Popen(
        [sys.executable, "-m", "danlu", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
