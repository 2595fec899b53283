"""Tests for run configs: defaults, YAML/JSON files, overrides, errors, paths, saving, help."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from danlu.config import (
    DEFAULT_MODEL,
    SECTIONS,
    Config,
    describe,
    load_config,
    save_config,
    validate,
)
from danlu.errors import UserError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, overrides: list[str] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ------------------------------------------------------------------------- loading


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.path == DEFAULT_MODEL
    assert cfg.data.format == "auto"
    assert cfg.data.system is None
    assert cfg.data.placeholders == {}
    assert cfg.lora.target_modules == ["all-linear"]
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.train.max_steps is None
    assert cfg.output.dir == "out/run"


def test_default_mutables_are_not_shared():
    a, b = Config(), Config()
    a.lora.target_modules.append("q_proj")
    a.data.placeholders["name"] = "Ada"
    assert b.lora.target_modules == ["all-linear"]
    assert b.data.placeholders == {}


def test_yaml_file(tmp_path):
    path = write(
        tmp_path / "run.yaml",
        """\
model:
  path: some/model
  dtype: bf16
lora:
  r: 16
  alpha: 32
  target_modules: [q_proj, k_proj]
train:
  batch_size: 2
  max_steps: 10
  gradient_checkpointing: true
  scheduler: linear
output:
  dir: out/x
""",
    )
    cfg = load_config(path)
    assert cfg.model.path == "some/model"
    assert cfg.model.dtype == "bf16"
    assert cfg.lora.r == 16
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.train.batch_size == 2
    assert cfg.train.max_steps == 10
    assert cfg.train.gradient_checkpointing is True
    assert cfg.train.scheduler == "linear"
    assert cfg.output.dir == "out/x"
    # untouched keys keep their defaults
    assert cfg.train.seed == Config().train.seed
    assert cfg.data == Config().data


def test_json_file(tmp_path):
    path = write(
        tmp_path / "run.json",
        json.dumps(
            {
                "train": {"lr": 0.001, "epochs": 2, "precision": "fp32"},
                "data": {"max_seq_length": 128, "system": "Be brief.", "placeholders": {"name": "Ada"}},
            },
            indent=2,
        ),
    )
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.train.epochs == 2.0
    assert cfg.train.precision == "fp32"
    assert cfg.data.max_seq_length == 128
    assert cfg.data.system == "Be brief."
    assert cfg.data.placeholders == {"name": "Ada"}


def test_scientific_notation_in_yaml_is_a_float(tmp_path):
    import yaml

    assert yaml.safe_load("lr: 2e-4")["lr"] == "2e-4"  # the trap: YAML 1.1 reads it as text
    cfg = load_config(write(tmp_path / "c.yaml", "train:\n  lr: 2e-4\n  weight_decay: 1e-2\n"))
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.lr == pytest.approx(0.0002)
    assert cfg.train.weight_decay == pytest.approx(0.01)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "# nothing yet\n")) == Config()


def test_config_file_not_found(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "config file not found" in message
    assert "nope.yaml" in message


# ----------------------------------------------------------------------- overrides


def test_dotted_overrides():
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "train.max_steps=5",
            "train.batch_size=3",
            "model.trust_remote_code=true",
            "data.system=You are terse.",
            "output.dir=out/try2",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.max_steps == 5
    assert cfg.train.batch_size == 3
    assert cfg.model.trust_remote_code is True
    assert cfg.data.system == "You are terse."
    assert cfg.output.dir == "out/try2"


def test_override_beats_file(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  lr: 1e-3\n  seed: 7\n")
    cfg = load_config(path, ["train.lr=5e-5"])
    assert cfg.train.lr == pytest.approx(5e-5)
    assert cfg.train.seed == 7


def test_placeholder_override_adds_one_entry(tmp_path):
    path = write(tmp_path / "c.yaml", "data:\n  placeholders:\n    author: Lab\n")
    cfg = load_config(path, ["data.placeholders.name=Ada"])
    assert cfg.data.placeholders == {"author": "Lab", "name": "Ada"}
    assert load_config(None, ["data.placeholders.name=Ada"]).data.placeholders == {"name": "Ada"}


def test_list_override():
    cfg = load_config(None, ["lora.target_modules=[q_proj,v_proj]"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_single_value_for_a_list_becomes_a_list():
    assert load_config(None, ["lora.target_modules=q_proj"]).lora.target_modules == ["q_proj"]


def test_null_override_for_optional_key():
    cfg = load_config(None, ["train.max_steps=3", "train.max_steps=null"])
    assert cfg.train.max_steps is None


def test_override_without_equals_sign():
    message = error_of(None, ["train.lr"])
    assert message.startswith("command line:")
    assert "key=value" in message


def test_subkey_on_a_plain_field_is_refused():
    message = error_of(None, ["train.lr.x=1"])
    assert "'train.lr' has no sub-keys" in message


def test_section_without_key_is_refused():
    message = error_of(None, ["train=1"])
    assert "'train' is a section" in message


# -------------------------------------------------------------------------- errors


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  batch_size: 2\n  learning_rate: 1e-4\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3:")
    assert "unknown key 'train.learning_rate'" in message
    assert "did you mean 'train.lr'" in message


def test_unknown_key_typo_suggests_closest(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  path: x/y\ntrain:\n  batch_sise: 2\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4:")
    assert "did you mean 'train.batch_size'" in message


def test_unknown_key_in_json_names_line(tmp_path):
    path = write(tmp_path / "c.json", '{\n  "train": {\n    "lr": 0.1,\n    "lrr": 1\n  }\n}\n')
    message = error_of(path)
    assert message.startswith(f"{path}:4:")
    assert "did you mean 'train.lr'" in message


def test_unknown_key_on_command_line():
    message = error_of(None, ["train.learning_rate=1e-4"])
    assert message.startswith("command line:")
    assert "did you mean 'train.lr'" in message


def test_unknown_section_suggestion(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  path: a/b\n\ntrian:\n  lr: 1e-4\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4:")
    assert "unknown section 'trian'" in message
    assert "did you mean 'train'" in message


def test_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  path: a/b\ntrain: 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3:")
    assert "section 'train' must be a mapping" in message


def test_top_level_not_a_mapping(tmp_path):
    message = error_of(write(tmp_path / "c.yaml", "- a\n- b\n"))
    assert "expected a mapping of sections" in message


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  batch_size: four\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2:")
    assert "train.batch_size must be an integer" in message
    assert "'four'" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=fast", "train.lr must be a number"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing must be true or false"),
        ("train.batch_size=2.5", "train.batch_size must be an integer"),
        ("train.batch_size=true", "train.batch_size must be an integer"),
        ("data.placeholders=[a]", "data.placeholders must be mapping"),
        ("train.max_steps=lots", "train.max_steps must be an integer or null"),
    ],
)
def test_wrong_types_on_command_line(override, key):
    message = error_of(None, [override])
    assert message.startswith("command line:")
    assert key in message


def test_literal_choice_error(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  seed: 1\n  scheduler: cosin\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3:")
    assert "train.scheduler must be one of constant, constant_with_warmup, linear, cosine" in message
    assert "did you mean 'cosine'" in message


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  lr: 1e-4\n  seed: [1\n  batch_size: 2\n")
    message = error_of(path)
    assert "not valid YAML" in message
    assert message.startswith(f"{path}:4:")


def test_json_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "c.json", '{\n  "train": {\n    "lr": \n  }\n}\n')
    message = error_of(path)
    assert "not valid JSON" in message
    assert message.startswith(f"{path}:4:")


# --------------------------------------------------------------------------- paths


def test_relative_data_path_resolved_next_to_config(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "train.jsonl").write_text("{}\n", encoding="utf-8")
    path = write(conf_dir / "c.yaml", "data:\n  path: train.jsonl\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert Path(cfg.data.path[0]) == (conf_dir / "train.jsonl").resolve()
    assert Path(cfg.data.path[0]).is_absolute()


def test_relative_data_path_left_alone_when_not_next_to_config(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = write(conf_dir / "c.yaml", "data:\n  path: data/train.jsonl\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(path).data.path == ["data/train.jsonl"]


def test_absolute_data_path_kept(tmp_path):
    target = tmp_path / "abs.jsonl"
    target.write_text("{}\n", encoding="utf-8")
    path = write(tmp_path / "c.yaml", f"data:\n  path: {target}\n")
    assert load_config(path).data.path == [str(target)]


def test_command_line_path_not_resolved_against_config_dir(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "train.jsonl").write_text("{}\n", encoding="utf-8")  # a decoy next to the config
    path = write(conf_dir / "c.yaml", "train:\n  seed: 1\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["data.path=train.jsonl"])
    assert cfg.data.path == ["train.jsonl"]


def test_non_path_keys_are_never_resolved(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "cosine").write_text("", encoding="utf-8")
    path = write(tmp_path / "c.yaml", "output:\n  dir: out\ndata:\n  system: cosine\n")
    cfg = load_config(path)
    assert cfg.output.dir == "out"
    assert cfg.data.system == "cosine"


# ------------------------------------------------------------------------ validate


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.batch_size=0"], "train.batch_size must be at least 1"),
        (["train.epochs=0"], "train.epochs > 0 or train.max_steps > 0"),
        (["train.grad_accum=0"], "train.grad_accum must be at least 1"),
        (["train.lr=0"], "train.lr must be positive"),
        (["train.max_steps=0", "train.epochs=1"], "train.max_steps must be positive"),
        (["train.warmup_ratio=1"], "train.warmup_ratio"),
        (["lora.r=0"], "lora.r must be at least 1"),
        (["lora.dropout=1"], "lora.dropout"),
        (["data.max_seq_length=4"], "data.max_seq_length must be at least 8"),
        (["output.dir="], "output.dir must not be empty"),
    ],
)
def test_validate_errors(overrides, fragment):
    message = error_of(None, overrides)
    assert message.startswith("config:")
    assert fragment in message


def test_epochs_zero_is_fine_with_max_steps():
    cfg = load_config(None, ["train.epochs=0", "train.max_steps=5"])
    assert cfg.train.max_steps == 5
    validate(cfg)


def test_validate_on_an_edited_config():
    cfg = Config()
    validate(cfg)
    cfg.train.batch_size = 0
    with pytest.raises(UserError, match="batch_size"):
        validate(cfg)


# ------------------------------------------------------------------- save/describe


def test_save_then_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "model.path=org/name",
            "data.path=/abs/train.jsonl",
            "data.system=Hi there.",
            "data.placeholders.name=艾达",
            "lora.target_modules=[q_proj,v_proj]",
            "lora.alpha=24",
            "train.lr=3e-5",
            "train.max_steps=7",
            "train.scheduler=linear",
            "output.tensorboard=false",
        ],
    )
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.data.placeholders == {"name": "艾达"}
    assert "艾达" in path.read_text(encoding="utf-8")  # written as text, not escapes


def test_save_writes_every_key(tmp_path):
    import yaml

    path = tmp_path / "saved.yaml"
    save_config(Config(), path)
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(saved) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        assert set(saved[section]) == {f.name for f in dataclasses.fields(cls)}
    assert load_config(path) == Config()


def test_describe_mentions_every_field():
    text = describe()
    for section, cls in SECTIONS.items():
        assert f"{section}:" in text
        for f in dataclasses.fields(cls):
            assert f"  {section}.{f.name} (" in text, f"{section}.{f.name} missing from describe()"
            assert f.metadata["help"] in text
    assert 'train.scheduler (one of constant, constant_with_warmup, linear, cosine, default "cosine")' in text
    assert "train.max_steps (an integer or null, default null)" in text


def test_tmp_cwd_is_untouched(tmp_path, monkeypatch):
    """Loading never writes anything (the output folder is train's business)."""
    monkeypatch.chdir(tmp_path)
    load_config(None, ["output.dir=out/x"])
    assert os.listdir(tmp_path) == []


def test_override_that_is_not_yaml_is_taken_as_text():
    cfg = load_config(None, ["data.system=[unbalanced: {"])
    assert cfg.data.system == "[unbalanced: {"
