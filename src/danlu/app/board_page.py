"""``danlu board``'s page: the Gradio components of the five steps and what each event calls.

The YAML editor on the Train step is the run's config. The form (the model box, the data files and
placeholders, the run name, the Train step's fields) writes what the user changed into it, through
:func:`danlu.app.board_config.merge_form`; leaving the YAML editor updates the form. What the
buttons do is on :class:`danlu.app.board.Board`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu.app import board_config as bc
from danlu.app import board_runs as br
from danlu.app.board_ship import add_tabs
from danlu.app.board_view import RUN_COLUMNS, SLOTS, L
from danlu.errors import UserError

# the Train step's form, row by row
LAYOUT = (
    ("method", "objective", "quantization"),
    ("rank", "steps", "epochs"),
    ("lr", "max_length", "packing"),
    ("save_every", "sample_every"),
    ("prompts",),
)
FORM = tuple(f for row in LAYOUT for f in row)


def _field(name: str, value: Any) -> Any:
    """The form component of one field of :data:`danlu.app.board_config.FIELDS`."""
    import gradio as gr

    if name == "method":
        return gr.Radio(["lora", "full", "freeze"], value=value, label=L("方法", "method"))
    if name == "objective":
        label = L(
            "目标（sft；偏好数据用 dpo/orpo/simpo/kto）",
            "objective (sft; dpo/orpo/simpo/kto for preference data)",
        )
        return gr.Dropdown(
            ["sft", "dpo", "orpo", "simpo", "kto"], value=value, label=label, elem_id="objective"
        )
    if name == "quantization":
        return gr.Dropdown(["none", "nf4", "fp4", "int8"], value=value, label=L("量化", "quantization"))
    if name == "packing":
        return gr.Checkbox(value, label=L("打包", "packing"), elem_id="packing")
    if name == "lr":
        return gr.Textbox(value, label=L("学习率", "learning rate"), max_lines=1, elem_id="lr")
    if name == "prompts":
        label = L("样例问题（每行一个，训练中回答）", "sample questions, one per line, answered as it trains")
        return gr.Textbox(value, lines=2, label=label, elem_id="prompts")
    labels = {
        "rank": (L("LoRA 秩", "LoRA rank"), 1),
        "steps": (L("步数（0 = 按轮数）", "steps (0: by epochs)"), 0),
        "epochs": (L("轮数", "epochs"), 0),
        "max_length": (L("最大长度", "max length"), 8),
        "save_every": (L("检查点间隔（续训用）", "checkpoint every (for Resume)"), 0),
        "sample_every": (L("每 N 步回答问题", "answer every N steps"), 0),
    }
    label, low = labels[name]
    return gr.Number(
        value,
        label=label,
        precision=None if name == "epochs" else 0,
        minimum=low,
        elem_id=name.replace("_", "-"),
    )


def _form_updates(cfg: dict) -> list[Any]:
    import gradio as gr

    values = bc.form_values(cfg)
    return [gr.update(value=values[f]) for f in FORM]


def build_page(board: Any) -> Any:
    """The page over ``board`` (a :class:`danlu.app.board.Board`)."""
    import gradio as gr

    name0 = bc.next_name(board.runs, bc.DEFAULT_PRESET)
    cfg0 = bc.put(bc.board_config(bc.DEFAULT_PRESET), "output.dir", str(board.runs / name0))
    form0 = bc.form_values(cfg0)
    paths0 = bc.get(cfg0, "data.path", [])
    keys0 = bc.placeholders_in([p for p in paths0 if Path(p).exists()])[:SLOTS]
    values0 = bc.get(cfg0, "data.placeholders", {}) or {}
    runs0 = br.scan(board.runs, board.procs)

    with gr.Blocks(title="丹炉 danlu board", analytics_enabled=False) as demo:
        gr.Markdown(
            "## 丹炉 danlu board\n"
            + L(
                "选模型 → 看数据 → 训练 → 对比 → 发布；每一步都运行并显示对应的 danlu 命令。",
                "model → data → train → try → ship; every step runs the danlu command it shows.",
            )
        )
        runs_box = gr.Textbox(
            str(board.runs), label=L("运行目录", "runs folder"), elem_id="runs-dir", max_lines=1
        )
        # hidden components, not gr.State (kept on the server): each event sends them together with
        # the YAML and the form, as the page has them at that moment
        keys = gr.JSON(keys0, visible=False)  # the placeholder names the slots stand for
        base = gr.JSON(form0, visible=False)  # what the form showed when it last matched the YAML
        seen = gr.State({})  # what the last refresh sent

        with gr.Tabs():
            with gr.Tab(L("① 模型", "1 Model"), id="tab-model"):
                with gr.Row():
                    model = gr.Textbox(
                        bc.get(cfg0, "model.path"),
                        label=L("模型", "model"),
                        elem_id="model",
                        max_lines=1,
                        info=L(
                            "别名（danlu models）、本地模型文件夹或 hub id",
                            "an alias (danlu models), a local model folder or a hub id",
                        ),
                    )
                    gpu_mem = gr.Textbox(
                        "",
                        label=L("按多少显存估算", "GPU memory to plan for"),
                        placeholder="16GB",
                        elem_id="gpu-mem",
                        max_lines=1,
                        info=L("留空：本机 GPU", "empty: this machine's GPU"),
                    )
                check = gr.Button(
                    L("检查环境和显存", "Check environment and memory"),
                    variant="primary",
                    elem_id="check-model",
                )
                env_md = gr.Markdown(elem_id="env")
                plan_md = gr.Markdown(elem_id="plan")
                with gr.Row():
                    fix = gr.Dropdown([], label=L("改法", "change"), elem_id="suggestion", scale=3)
                    apply_fix = gr.Button(L("应用", "Apply"), elem_id="apply-fix", scale=1)
                with gr.Accordion("danlu env", open=False):
                    env_full = gr.Code(language=None, elem_id="env-full")

            with gr.Tab(L("② 数据", "2 Data"), id="tab-data"):
                with gr.Row():
                    bundled = gr.Dropdown(
                        list(bc.bundled_data()),
                        value=Path(paths0[0]).name if paths0 else None,
                        label=L("自带数据", "bundled data"),
                        elem_id="bundled",
                    )
                    upload = gr.File(
                        file_count="multiple", label=L("上传文件", "upload files"), elem_id="upload"
                    )
                paths = gr.Textbox(
                    "\n".join(paths0),
                    lines=2,
                    label=L("数据文件（每行一个）", "data files, one per line"),
                    elem_id="data-path",
                )
                gr.Markdown(
                    L(
                        "数据里的 {{占位符}} 会用下面的值替换",
                        "{{placeholders}} in the data are filled with these values",
                    )
                )
                with gr.Row():
                    slots = [
                        gr.Textbox(
                            str(values0.get(keys0[i], "")) if i < len(keys0) else "",
                            label=f"{{{{{keys0[i]}}}}}" if i < len(keys0) else "",
                            visible=i < len(keys0),
                            elem_id=f"placeholder-{i}",
                            max_lines=1,
                        )
                        for i in range(SLOTS)
                    ]
                check_data = gr.Button(L("检查数据", "Check data"), variant="primary", elem_id="check-data")
                verdict = gr.Markdown(elem_id="data-verdict")
                with gr.Row():
                    report = gr.Markdown(elem_id="data-report")
                    histogram = gr.Image(
                        label=L("长度分布", "token lengths"),
                        type="filepath",
                        interactive=False,
                        elem_id="histogram",
                    )
                preview = gr.HTML(elem_id="data-preview")

            with gr.Tab(L("③ 训练", "3 Train"), id="tab-train"):
                with gr.Row():
                    with gr.Column(scale=1):
                        with gr.Row(equal_height=True):
                            preset = gr.Dropdown(
                                list(bc.presets()),
                                value=bc.DEFAULT_PRESET,
                                label=L("预设", "preset"),
                                elem_id="preset",
                                scale=2,
                            )
                            apply_preset = gr.Button(L("套用", "Use it"), elem_id="apply-preset", scale=1)
                        gr.Markdown(
                            L(
                                "预设只改训练设置；模型和数据保持第 1、2 步的选择。",
                                "A preset sets the training; the model and data stay as chosen in steps 1 and 2.",
                            )
                        )
                        run_name = gr.Textbox(
                            name0,
                            label=L("运行名（输出文件夹）", "run name (output folder)"),
                            elem_id="run-name",
                            max_lines=1,
                        )
                        fields = {}
                        for row in LAYOUT:
                            with gr.Row():
                                for field in row:
                                    fields[field] = _field(field, form0[field])
                        form_msg = gr.Markdown(elem_id="form-message")
                    with gr.Column(scale=1):
                        yaml_box = gr.Code(
                            bc.dump(cfg0),
                            language="yaml",
                            label=L("完整配置", "the whole config (YAML)"),
                            elem_id="config-yaml",
                            interactive=True,
                        )
                with gr.Row():
                    start = gr.Button(L("开始训练", "Start"), variant="primary", elem_id="start")
                    stop = gr.Button(L("停止", "Stop"), variant="stop", elem_id="stop")
                    resume = gr.Button(L("续训", "Resume"), elem_id="resume")
                train_msg = gr.Markdown(elem_id="train-message")
                runs_table = gr.Dataframe(
                    br.table(runs0) or None,
                    headers=RUN_COLUMNS,
                    interactive=False,
                    elem_id="runs",
                    label=L("运行", "runs"),
                )
                watched = gr.Dropdown(
                    [r.name for r in runs0],
                    value=runs0[0].name if runs0 else None,
                    label=L("查看", "watch"),
                    elem_id="watched",
                )
                progress = gr.HTML(elem_id="progress")
                with gr.Row():
                    loss_plot = gr.LinePlot(
                        None,
                        x="step",
                        y="value",
                        color="series",
                        label=L("损失", "loss"),
                        y_title="loss",
                        color_title="",
                        elem_id="loss-plot",
                    )
                    lr_plot = gr.LinePlot(
                        None,
                        x="step",
                        y="value",
                        color="series",
                        label=L("学习率", "learning rate"),
                        y_title="learning rate",
                        color_title="",
                        elem_id="lr-plot",
                    )
                samples = gr.HTML(elem_id="samples")
                with gr.Accordion(L("日志", "log"), open=False):
                    log = gr.Code(language=None, elem_id="run-log")

            add_tabs(board.ship, runs_box)  # 4 Try it, 5 Ship it

        timer = gr.Timer(2.0)

        # ------------------------------------------------------------------- config edits
        # `.change`, not `.input`: Gradio's textboxes send `input` for keys typed, not for text
        # pasted or filled in. Every edit sends the whole form (merge_form writes only what differs
        # from `base`), so two edits in flight at once cannot undo each other.
        form_inputs = [model, paths, runs_box, run_name, keys, *slots, *fields.values()]

        def form_of(values: tuple) -> dict[str, Any]:
            model_path, data, runs_text, name, names, *rest = values
            form = dict(zip(FORM, rest[SLOTS:], strict=True))
            form.update(model=model_path, data=data, output=str(board.folder(runs_text) / name.strip()))
            form["placeholders"] = {k: rest[i] for i, k in enumerate(names or [])}
            return form

        def sync(text: str, was: dict, *values: Any) -> tuple[Any, Any, str]:
            try:
                new, now = bc.merge_form(text, was, form_of(values))
            except (UserError, TypeError, ValueError) as e:
                return gr.skip(), gr.skip(), f"**✗ {e}**"
            return (gr.skip() if new == text else new), now, ""

        for component in [model, paths, runs_box, run_name, *slots, *fields.values()]:
            component.change(
                sync,
                [yaml_box, base, *form_inputs],
                [yaml_box, base, form_msg],
                concurrency_id="config",  # one at a time, in order
                concurrency_limit=1,
            )

        def from_yaml(text: str, names: list[str], runs_text: str) -> list[Any]:
            try:
                cfg = bc.parse(text)
                values = bc.form_values(cfg)
            except (UserError, TypeError, ValueError) as e:
                return [*[gr.skip()] * (len(FORM) + 3 + SLOTS), f"**✗ {e}**"]
            out = Path(values["output"])
            name = out.name if out.parent == board.folder(runs_text) else gr.skip()
            slot_values = [values["placeholders"].get(k, "") for k in names or []]
            slot_updates = [gr.update(value=v) for v in slot_values] + [gr.skip()] * (
                SLOTS - len(slot_values)
            )
            fields_now = [gr.update(value=values[f]) for f in FORM]
            return [*fields_now, values["model"], values["data"], name, *slot_updates, values, ""]

        yaml_box.blur(
            from_yaml,
            [yaml_box, keys, runs_box],
            [*fields.values(), model, paths, run_name, *slots, base, form_msg],
            concurrency_id="config",
        )

        def use_preset(name: str, text: str) -> list[Any]:
            try:
                current = bc.parse(text)
            except UserError:
                current = {}
            cfg = bc.board_config(name, current)
            return [bc.dump(cfg), bc.form_values(cfg), *_form_updates(cfg)]

        apply_preset.click(
            use_preset, [preset, yaml_box], [yaml_box, base, *fields.values()], concurrency_id="config"
        )

        def use_fix(line: str | None, text: str) -> list[Any]:
            if not line:
                return [gr.skip()] * (len(FORM) + 2)
            cfg = bc.apply_overrides(bc.parse(text), line)
            return [bc.dump(cfg), bc.form_values(cfg), *_form_updates(cfg)]

        apply_fix.click(use_fix, [fix, yaml_box], [yaml_box, base, *fields.values()], concurrency_id="config")

        # the checks and Start read the config with the form merged in, as the page shows it now,
        # even when the last edit's own update has not come back yet
        def current(text: str, was: dict, values: tuple) -> str:
            try:
                return bc.merge_form(text, was, form_of(values))[0]
            except (UserError, TypeError, ValueError):
                return text  # the form's own line says what is wrong

        def do_check(gpu: str, text: str, was: dict, *values: Any) -> Any:
            return board.check_model(values[0], gpu, current(text, was, values))

        check.click(do_check, [gpu_mem, yaml_box, base, *form_inputs], [env_md, env_full, plan_md, fix])

        # ------------------------------------------------------------------------- data
        paths.change(board.data_changed, [paths, yaml_box], [keys, *slots])
        bundled.input(lambda name: str(bc.bundled_data()[name]) if name else gr.skip(), [bundled], [paths])
        upload.upload(board.upload, [upload, runs_box], [paths])

        def do_check_data(text: str, was: dict, *values: Any) -> Any:
            yield from board.check_data(values[1], current(text, was, values))

        check_data.click(do_check_data, [yaml_box, base, *form_inputs], [verdict, report, histogram, preview])

        # ------------------------------------------------------------------------ train
        def do_start(text: str, was: dict, *values: Any) -> tuple[Any, Any, Any]:
            try:
                text, _ = bc.merge_form(text, was, form_of(values))
            except (UserError, TypeError, ValueError) as e:
                return f"**✗ {e}**", gr.skip(), gr.skip()
            return board.start(text, values[2], values[3])

        start.click(
            do_start, [yaml_box, base, *form_inputs], [train_msg, watched, run_name], concurrency_id="config"
        )
        stop.click(board.stop, [runs_box, watched], [train_msg])

        def do_resume(text: str, runs_text: str, name: str | None) -> tuple[Any, Any, Any]:
            if not name:
                return f"**{L('先选择要续训的运行', 'pick the run to resume')}**", gr.skip(), gr.skip()
            message, _, _ = board.start(text, runs_text, name, resume_name=name)
            return message, gr.skip(), gr.skip()

        resume.click(do_resume, [yaml_box, runs_box, watched], [train_msg, watched, run_name])
        watch_out = [runs_table, watched, progress, loss_plot, lr_plot, samples, log, seen]
        timer.tick(board.refresh, [runs_box, watched, seen], watch_out)
        watched.change(lambda r, w: board.refresh(r, w, {}), [runs_box, watched], watch_out)

        demo.load(
            lambda r, n: bc.next_name(board.folder(r), n.strip() or bc.DEFAULT_PRESET),
            [runs_box, run_name],
            [run_name],
        )
    return demo
