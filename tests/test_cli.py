"""Tests for the ``danlu`` command: help, one-line user errors, output-folder safety, presets.

Nothing here trains: every ``train`` call stops at a check before the first step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_jsonl
from danlu.app.cli import PRESETS, main
from danlu.config import CONFIG_FILENAME, load_config

VERBS = ["train", "chat", "demo", "models", "configs", "env"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 2 and exactly one stderr line, ``danlu: error: ...``, with no traceback."""
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    line = lines[0]
    assert line.startswith("danlu: error: ")
    for fragment in fragments:
        assert fragment in line
    return line


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [{"instruction": "hi", "output": "hello"}])


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        "train:\n  max_steps: 1\n  batch_size: 1\noutput:\n  tensorboard: false\n", encoding="utf-8"
    )
    return path


# ---------------------------------------------------------------------------- help


@pytest.mark.parametrize("verb", VERBS)
def test_help_for_each_verb(capsys, verb):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: danlu {verb}")


def test_top_level_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


def test_train_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "config keys:" in out
    for key in (
        "train.lr",
        "train.batch_size",
        "lora.target_modules",
        "data.placeholders",
        "output.dir",
        "model.path",
    ):
        assert f"  {key} (" in out
    assert "--overwrite" in out


def test_no_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: danlu" in capsys.readouterr().err


def test_stray_flag_is_a_usage_error(capsys, config_file):
    with pytest.raises(SystemExit) as info:
        main(["train", str(config_file), "--bogus"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# -------------------------------------------------------------------- train errors


def test_unknown_config_key(capsys, tmp_path, config_file):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "train", config_file, "train.learning_rate=1e-4", f"output.dir={out}")
    assert_user_error(code, err, "unknown key 'train.learning_rate'", "did you mean 'train.lr'")
    assert stdout == ""
    assert not out.exists()


def test_unknown_config_key_in_file_names_line(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 1\n  epoch: 2\n", encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", path, f"output.dir={out}")
    assert_user_error(code, err, f"{path}:3:", "did you mean 'train.epochs'")
    assert not out.exists()


def test_wrong_value_type(capsys, tmp_path, config_file):
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", config_file, "train.batch_size=four", f"output.dir={out}")
    assert_user_error(code, err, "train.batch_size must be an integer")
    assert not out.exists()


def test_overrides_after_flags_are_applied(capsys, tmp_path, config_file):
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", config_file, "--no-progress", "train.lr=fast", f"output.dir={out}")
    assert_user_error(code, err, "train.lr must be a number")
    assert not out.exists()


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run(capsys, "train", tmp_path / "nope.yaml")
    assert_user_error(code, err, "config file not found", "nope.yaml")


def test_missing_data_file(capsys, tmp_path, config_file, tiny_model_dir):
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "train",
        config_file,
        f"model.path={tiny_model_dir}",
        f"data.path={tmp_path / 'nope.jsonl'}",
        f"output.dir={out}",
    )
    assert_user_error(code, err, "not found", "nope.jsonl")
    assert not out.exists()


def test_data_path_not_set(capsys, tmp_path, config_file, tiny_model_dir):
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", config_file, f"model.path={tiny_model_dir}", f"output.dir={out}")
    assert_user_error(code, err, "data.path is not set")
    assert not out.exists()


def test_empty_dataset_file(capsys, tmp_path, config_file, tiny_model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("", encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "train", config_file, f"model.path={tiny_model_dir}", f"data.path={data}", f"output.dir={out}"
    )
    assert_user_error(code, err, str(data), "empty")
    assert not out.exists()


def test_bad_record_names_file_and_line(capsys, tmp_path, config_file, tiny_model_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q"}])
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "train", config_file, f"model.path={tiny_model_dir}", f"data.path={data}", f"output.dir={out}"
    )
    assert_user_error(code, err, f"{data}:2:", "'output'")
    assert not out.exists()


def test_missing_model_path(capsys, tmp_path, config_file, data_file):
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "train",
        config_file,
        "model.path=/nonexistent/dir",
        f"data.path={data_file}",
        f"output.dir={out}",
    )
    assert_user_error(code, err, "model.path /nonexistent/dir")
    assert not out.exists()


def test_model_folder_without_config_json(capsys, tmp_path, config_file, data_file):
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "train", config_file, f"model.path={model}", f"data.path={data_file}", f"output.dir={out}"
    )
    assert_user_error(code, err, "config.json")
    assert not out.exists()


# ------------------------------------------------------------------ output folder


def test_a_conversion_placed_by_another_process_is_kept_not_replaced(tmp_path):
    """Two processes converting the embedded model at once (the board starts two commands): the one
    that finishes second keeps the folder the first placed, whose files readers may be loading; a
    folder left by an interrupted conversion (no config.json) is replaced."""
    from danlu.model import place

    target, tmp = tmp_path / "m", tmp_path / ".m-2"
    for folder, text in ((target, "first"), (tmp, "second")):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer.json").write_text(text)
    inode = target.stat().st_ino
    place(tmp, target)
    assert (target / "tokenizer.json").read_text() == "first" and target.stat().st_ino == inode
    (target / "config.json").unlink()  # as an interrupted conversion leaves it
    place(tmp, target)
    assert (target / "tokenizer.json").read_text() == "second" and not tmp.exists()


def test_existing_run_refused_without_overwrite(capsys, tmp_path, config_file, data_file, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / CONFIG_FILENAME).write_text("train:\n  lr: 0.1\n", encoding="utf-8")
    (out / "keep.txt").write_text("previous run", encoding="utf-8")
    code, _, err = run(
        capsys,
        "train",
        config_file,
        f"model.path={tiny_model_dir}",
        f"data.path={data_file}",
        f"output.dir={out}",
    )
    assert_user_error(code, err, "already holds a run", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILENAME, "keep.txt"])
    assert (out / CONFIG_FILENAME).read_text(encoding="utf-8") == "train:\n  lr: 0.1\n"
    assert (out / "keep.txt").read_text(encoding="utf-8") == "previous run"


def test_foreign_folder_refused_even_with_overwrite(capsys, tmp_path, config_file, data_file, tiny_model_dir):
    out = tmp_path / "precious"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work", encoding="utf-8")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    code, _, err = run(
        capsys,
        "train",
        config_file,
        "--overwrite",
        f"model.path={tiny_model_dir}",
        f"data.path={data_file}",
        f"output.dir={out}",
    )
    assert_user_error(code, err, "holds no danlu run")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["sub", "sub/data.bin", "thesis.tex"]
    assert (out / "thesis.tex").read_text(encoding="utf-8") == "years of work"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"


# --------------------------------------------------------------------------- chat


def test_chat_compare_needs_adapter(capsys):
    code, stdout, err = run(capsys, "chat", "--compare")
    assert_user_error(code, err, "--compare needs --adapter")
    assert stdout == ""


def test_chat_missing_adapter_folder(capsys, tmp_path):
    code, _, err = run(capsys, "chat", "--adapter", tmp_path / "nope")
    assert_user_error(code, err, "--adapter", "no such folder")


# ------------------------------------------------------------------------ configs


def test_configs_list(capsys):
    code, out, err = run(capsys, "configs", "list")
    assert code == 0
    assert err == ""
    names = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert "identity" in names
    assert "lora-7b" in names
    assert "danlu configs copy" in out


def test_configs_copy_identity(capsys, tmp_path, monkeypatch):
    dest = tmp_path / "mine"
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "configs", "copy", "identity", dest)
    assert code == 0
    assert err == ""
    assert (dest / "identity.yaml").read_bytes() == (PRESETS / "identity.yaml").read_bytes()
    assert (dest / "identity.json").read_bytes() == (PRESETS / "identity.json").read_bytes()
    assert f"wrote {dest / 'identity.yaml'}" in out
    assert f"danlu train {dest / 'identity.yaml'}" in out
    cfg = load_config(dest / "identity.yaml")
    assert Path(cfg.data.path[0]) == (dest / "identity.json").resolve()
    assert cfg.data.placeholders == {"name": "Danlu", "author": "Furnace Lab"}


def test_configs_copy_twice_refuses(capsys, tmp_path):
    dest = tmp_path / "mine"
    assert run(capsys, "configs", "copy", "identity", dest)[0] == 0
    (dest / "identity.yaml").write_text("# edited\n", encoding="utf-8")
    code, out, err = run(capsys, "configs", "copy", "identity", dest)
    assert_user_error(code, err, "already exists")
    assert "wrote" not in out
    assert (dest / "identity.yaml").read_text(encoding="utf-8") == "# edited\n"


def test_configs_copy_unknown_preset(capsys, tmp_path):
    dest = tmp_path / "dest"
    code, _, err = run(capsys, "configs", "copy", "nosuch", dest)
    assert_user_error(code, err, "no preset named 'nosuch'", "identity")
    assert not dest.exists()


def test_configs_copy_preset_without_bundled_data(capsys, tmp_path):
    dest = tmp_path / "dest"
    code, _, _ = run(capsys, "configs", "copy", "lora-7b", dest)
    assert code == 0
    assert sorted(p.name for p in dest.iterdir()) == ["lora-7b.yaml"]


# ------------------------------------------------------------------------- models


def test_models_lists_default_alias(capsys):
    code, out, err = run(capsys, "models")
    assert code == 0
    assert "smollm2-135m-instruct" in out
    assert "cache:" in out
