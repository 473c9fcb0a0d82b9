"""Config validation: typo'd fields, wrong types and meaningless values are one-line errors naming the source
(a Python config file, a saved config.json or `--set`), the dotted field, the value and what is allowed;
the same checks hold on all three paths. Also `train.dist_timeout_s` and the umask-honouring config writer."""

from __future__ import annotations

import json
import os
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from eva02.cli import main
from eva02.engine.config import (
    RULES,
    ConfigError,
    OptimCfg,
    RunConfig,
    ScheduleCfg,
    atomic_write_text,
    load_config,
    load_run,
    override,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eva02"
HEADER = "from eva02.engine.config import *\n\n"


def _write(tmp_path: Path, body: str, name: str = "c.py") -> Path:
    p = tmp_path / name
    p.write_text(HEADER + body)
    return p


def _raises(message: str):
    return pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\["))


def test_typo_in_a_config_file_names_file_line_and_valid_keys(tmp_path: Path) -> None:
    p = _write(tmp_path, "config = RunConfig(\n    optim=OptimCfg(lrr=1),\n)\n")
    with _raises(f"config file '{p}', line 4: unknown config key 'optim.lrr'; valid keys in optim: lr, layer_decay"):
        load_run(p)
    p = _write(tmp_path, "config = RunConfig(optimizer=OptimCfg())\n")
    with _raises(f"config file '{p}', line 3: unknown config section 'optimizer'; valid sections: model, data"):
        load_run(p)


@pytest.mark.parametrize(
    "body, message",
    [
        ("DataCfg(batch_size='8')", "data.batch_size='8': expects int"),
        ("DataCfg(batch_size=True)", "data.batch_size=True: expects int"),
        ("OptimCfg(lr='1e-4')", "optim.lr='1e-4': expects float"),
        ("EmaCfg(enabled='yes')", "ema.enabled='yes': expects bool"),
        ("ModelCfg(use_ema='no')", "model.use_ema='no': expects bool | None"),
        ("DataCfg(root=3)", "data.root=3: expects str"),
        ("OptimCfg(betas=(0.9, 'x'))", "optim.betas=(0.9, 'x'): expects tuple[float, ...]"),
    ],
)
def test_wrong_types_in_a_config_file(tmp_path: Path, body: str, message: str) -> None:
    section = body.split("Cfg")[0].lower()
    p = _write(tmp_path, f"config = RunConfig({section}={body})\n")
    with _raises(f"config file '{p}', line 3: {message}"):
        load_config(p)


def test_python_values_are_fitted_to_the_field_types() -> None:
    cfg = RunConfig(schedule=ScheduleCfg(warmup_epochs=5), optim=OptimCfg(betas=[0.9, 0.98]))
    assert isinstance(cfg.schedule.warmup_epochs, float) and cfg.optim.betas == (0.9, 0.98)
    assert hash(cfg)  # a list would make the frozen config unhashable


def _numeric_keys() -> list[str]:
    cfg = RunConfig()
    keys = []
    for s in fields(cfg):
        for name, tp in typing.get_type_hints(type(getattr(cfg, s.name))).items():
            if tp in (int, float):
                keys.append(f"{s.name}.{name}")
    return keys


def test_every_numeric_and_tuple_field_has_a_rule() -> None:
    cfg = RunConfig()
    for s in fields(cfg):
        for name, tp in typing.get_type_hints(type(getattr(cfg, s.name))).items():
            if tp in (int, float) or typing.get_origin(tp) is tuple:
                assert f"{s.name}.{name}" in RULES, f"{s.name}.{name} has no range check"
    assert len(_numeric_keys()) > 40


@pytest.mark.parametrize("key", _numeric_keys())
def test_negative_values_are_rejected_everywhere(key: str) -> None:
    # No numeric field of the run config has a meaning below zero.
    with _raises(f"--set: {key}=-1"):
        override(RunConfig(), {key: "-1"})


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("ema.decay", "1", "float in [0, 1)"),
        ("ema.decay", "1.5", "float in [0, 1)"),
        ("schedule.warmup_epochs", "-1", "float >= 0"),
        ("optim.global_batch", "-8", "int >= 0"),
        ("checkpoint.keep_last", "0", "int >= 1"),
        ("train.dist_timeout_s", "0", "float > 0"),
        ("data.batch_size", "0", "int > 0"),
        ("schedule.epochs", "0", "int > 0"),
        ("model.drop_path", "1", "float in [0, 1)"),
        ("model.patch_grad_scale", "2", "float in [0, 1]"),
        ("data.crop_pct", "0", "float in (0, 1]"),
        ("data.hflip", "1.5", "float in [0, 1]"),
        ("data.randaug_m", "11", "int in [0, 10]"),
        ("data.smoothing", "1", "float in [0, 1)"),
        ("optim.layer_decay", "0", "float in (0, 1]"),
        ("optim.eps", "0", "float > 0"),
        ("optim.betas", "0.9,1.0", "two numbers in [0, 1)"),
        ("optim.betas", "0.9", "two numbers in [0, 1)"),
        ("data.rrc_scale", "0.5,0.2", "two numbers 0 < min <= max <= 1"),
        ("data.rrc_ratio", "0,1", "two numbers 0 < min <= max"),
        ("data.mean", "0.5,0.5", "three numbers (R, G, B)"),
        ("data.std", "0.5,0,0.5", "three numbers > 0 (R, G, B)"),
        ("data.interpolation", "cubic", "one of 'bicubic', 'bilinear', 'nearest'"),
        ("train.parallel", "tp", "one of 'ddp', 'fsdp'"),
        ("train.task", "caption", "one of 'classify', 'mim'"),
        ("model.name", "tinyy", "a variant (test, tiny, small, base, large) or a zoo name"),
        ("mim.teacher_kind", "timm", "one of 'open_clip', 'eva02_clip', 'eva02'"),
        ("mim.teacher_amp", "fp8", "one of 'fp32', 'bf16', 'fp16', 'none'"),
        ("mim.teacher_name", "", "a non-empty name"),
        ("mim.num_masking", "300", "int in [1, 256]"),
        ("mim.min_aspect", "2", "float in (0, 1]"),
        ("optim.lr", "1e999", "a finite float"),
    ],
)
def test_out_of_range_values_name_field_value_and_range(key: str, value: str, allowed: str) -> None:
    with _raises(f"--set: {key}=") as e:
        override(RunConfig(), {key: value})
    assert f": expects {allowed}" in str(e.value) and "\n" not in str(e.value)


def test_cross_field_rules() -> None:
    with _raises("--set: schedule.min_lr=0.001: expects a value <= optim.lr=0.0002"):
        override(RunConfig(), {"schedule.min_lr": "1e-3"})
    with _raises("schedule.warmup_lr=0.001: expects a value <= optim.lr=0.0002"):
        override(RunConfig(), {"schedule.warmup_lr": "1e-3"})
    with _raises("model.init='pretrained': expects a checkpoint path or ''"):
        override(RunConfig(), {"model.init": "pretrained", "model.name": "tiny"})
    with _raises("mim.min_num=200: expects a value <= mim.num_masking=105"):
        override(RunConfig(), {"mim.min_num": 200})
    with _raises("mim.max_num=8: expects 0 or a value >= mim.min_num=16"):
        override(RunConfig(), {"mim.max_num": 8})
    # Changed together in one override, the pair is checked as a whole.
    cfg = override(RunConfig(), {"optim.lr": "1e-2", "schedule.min_lr": "1e-3"})
    assert (cfg.optim.lr, cfg.schedule.min_lr) == (1e-2, 1e-3)


def test_every_bad_key_is_reported_in_one_line() -> None:
    with pytest.raises(ConfigError) as e:
        override(RunConfig(), {"ema.decay": 2, "optim.lr": 0, "optim.lrr": 1, "data.batch_size": "x"})
    text = str(e.value)
    assert text.startswith("--set: ") and "\n" not in text
    for part in ("ema.decay=2.0", "optim.lr=0.0", "'optim.lrr'", "data.batch_size='x'"):
        assert part in text


def test_the_same_checks_hold_for_saved_config_json(tmp_path: Path) -> None:
    saved = RunConfig().to_dict()
    saved["ema"]["decay"] = 1.0
    saved["optim"]["lr"] = float("nan")
    p = tmp_path / "config.json"
    p.write_text(json.dumps(saved))
    with _raises(f"config file '{p}': optim.lr=nan: expects a finite float; ema.decay=1.0: expects float in [0, 1)"):
        load_run(p)
    p.write_text('{"optim": [1, 2]}')
    with _raises(f"config file '{p}': section 'optim' expects a mapping, got list"):
        load_run(p)
    p.write_text("{not json")
    with _raises(f"config file '{p}': not valid JSON"):
        load_run(p)


def test_errors_name_the_file_they_come_from(tmp_path: Path) -> None:
    base = _write(tmp_path, "config = RunConfig(ema=EmaCfg(decay=1.5))\n", "base.py")
    derived = _write(tmp_path, f"config = override(load_config({str(base)!r}), {{'optim.lr': 1e-3}})\n", "derived.py")
    with _raises(f"config file '{base}', line 3: ema.decay=1.5: expects float in [0, 1)"):
        load_run(derived)
    ok = _write(tmp_path, "config = RunConfig()\n", "ok.py")
    derived = _write(tmp_path, f"config = override(load_config({str(ok)!r}), {{'optim.lr': -1}})\n", "derived.py")
    with _raises(f"config file '{derived}', line 3: optim.lr=-1.0: expects float > 0"):
        load_run(derived)
    broken = _write(tmp_path, "config = RunConfig(model=ModelCfgg())\n", "broken.py")
    with _raises(f"config file '{broken}', line 3: NameError: name 'ModelCfgg' is not defined"):
        load_run(broken)


def test_cli_reports_a_bad_config_file_in_one_line(tmp_path: Path, capsys) -> None:
    p = _write(tmp_path, "config = RunConfig(data=DataCfg(batch_size='8'))\n")
    assert main(["train", str(p), "--work-dir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"eva02 train: error: config file '{p}', line 3: data.batch_size='8': expects int"
    p = _write(tmp_path, "config = RunConfig(optim=OptimCfg(lrr=1))\n")
    assert main(["test", str(p), "ckpt.pt", "--work-dir", str(tmp_path / "wd")]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    tiny = str(CONFIGS / "eva02_tiny_p14_8xb16_in1k.py")
    assert main(["train", tiny, "--work-dir", str(tmp_path / "wd"), "--set", "ema.decay=1.5"]) == 2
    assert capsys.readouterr().err.strip() == "eva02 train: error: --set: ema.decay=1.5: expects float in [0, 1)"
    assert not (tmp_path / "wd").exists()  # nothing written for a rejected config


def test_dist_timeout_is_a_train_setting(tmp_path: Path) -> None:
    cfg = RunConfig()
    assert cfg.train.dist_timeout_s == 600
    cfg = override(cfg, {"train.dist_timeout_s": "1800"})
    assert cfg.train.dist_timeout_s == 1800.0
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json").train.dist_timeout_s == 1800.0
    for bad in ("0", "-5"):
        with _raises("train.dist_timeout_s="):
            override(cfg, {"train.dist_timeout_s": bad})


def test_config_writer_honours_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        save_config(RunConfig(), tmp_path / "new" / "config.json")  # the folder is created
        atomic_write_text(tmp_path / "r.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "config.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert load_config(tmp_path / "new" / "config.json") == RunConfig()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporaries left behind
