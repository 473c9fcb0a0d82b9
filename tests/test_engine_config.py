"""Run configs: every shipped config loads with the official recipe values; overrides are checked against
field names and types with clear errors; the resolved config round-trips through JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from eva02.cli import main
from eva02.engine.config import RunConfig, load_config, load_run, override, parse_options, save_config
from eva02.engine.tasks import model_config
from eva02.engine.train import accumulation

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eva02"

# size: (img, lr, layer decay, epochs, warmup, drop path, smoothing), official README table
RECIPES = {
    "tiny": (336, 2e-4, 0.9, 100, 5, 0.1, 0.1),
    "small": (336, 1e-4, 0.8, 100, 5, 0.1, 0.1),
    "base": (448, 1e-4, 0.7, 30, 3, 0.1, 0.1),
    "large": (448, 5e-5, 0.8, 30, 3, 0.15, 0.2),
}


@pytest.mark.parametrize("size", RECIPES)
def test_in1k_configs_hold_the_official_recipe(size: str) -> None:
    cfg = load_config(CONFIGS / f"eva02_{size}_p14_8xb16_in1k.py")
    img, lr, ld, ep, wu, dp, sm = RECIPES[size]
    assert (cfg.model.img_size, cfg.optim.lr, cfg.optim.layer_decay) == (img, lr, ld)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.model.drop_path, cfg.data.smoothing) == (
        ep,
        wu,
        dp,
        sm,
    )
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.clip_grad == 0 and cfg.model.patch_grad_scale == 0
    assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.reprob, cfg.data.randaug_m) == (0, 0, 0, 9)
    assert cfg.ema.enabled and cfg.ema.decay == 0.9999
    # 8xb16: 16 per device; global 1024 from accumulation on any device count that divides it.
    assert cfg.data.batch_size == 16 and cfg.optim.global_batch == 1024
    assert [accumulation(cfg, w) for w in (1, 8, 64)] == [64, 8, 1]
    m = model_config(cfg)
    assert (m.num_classes, m.img_size, m.patch_size) == (1000, img, 14)


def test_every_shipped_config_loads() -> None:
    files = sorted(CONFIGS.glob("eva02_*.py"))
    names = {f.name for f in files}
    for size in ("tiny", "small", "base", "large"):
        assert f"eva02_{size}_p14_headless.py" in names
    assert {"eva02_base_p16_headless.py", "eva02_large_p16_headless.py", "eva02_base_p14_medft_8xb16_in1k.py",
            "eva02_large_p14_medft_8xb16_in1k.py"} <= names  # fmt: skip
    for f in files:
        cfg, _ = load_run(f)
        model_config(cfg)  # the model part resolves (zoo name or variant)
    medft = load_config(CONFIGS / "eva02_large_p14_medft_8xb16_in1k.py")
    assert (medft.optim.lr, medft.optim.layer_decay, medft.optim.global_batch, medft.schedule.epochs) == (
        2e-5, 0.85, 512, 20)  # fmt: skip
    p16 = model_config(load_config(CONFIGS / "eva02_base_p16_headless.py"))
    assert (p16.patch_size, p16.num_classes, p16.img_size) == (16, 0, 224)


def test_overrides_are_typed() -> None:
    cfg = override(RunConfig(), parse_options(["optim.lr=1e-4", "ema.enabled=true", "optim.betas=0.9,0.98",
                                               "model.use_ema=None", "data.batch_size=32"]))  # fmt: skip
    assert cfg.optim.lr == 1e-4 and cfg.ema.enabled is True and cfg.optim.betas == (0.9, 0.98)
    assert cfg.model.use_ema is None and cfg.data.batch_size == 32
    assert override(cfg, {"model.use_ema": "false"}).model.use_ema is False


@pytest.mark.parametrize(
    "option, message",
    [
        ("optim.lrr=1", "--set: unknown config key 'optim.lrr'; valid keys in optim: lr, layer_decay"),
        ("optimizer.lr=1", "--set: unknown config section 'optimizer'"),
        ("optim.lr=fast", "--set: optim.lr='fast': expects float"),
        ("data.batch_size=1.5", "--set: data.batch_size=1.5: expects int"),
        ("ema.enabled=maybe", "--set: ema.enabled='maybe': expects bool"),
        ("train.amp=fp8", "--set: train.amp='fp8': expects one of 'fp32', 'bf16', 'fp16'"),
        ("optim.lr", "--set: config option 'optim.lr' is not KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_problem(option: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        override(RunConfig(), parse_options([option]))


def test_cli_reports_bad_override_in_one_line(capsys) -> None:
    rc = main(["train", str(CONFIGS / "eva02_tiny_p14_8xb16_in1k.py"), "--set", "optim.lrr=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "valid keys in optim" in err


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = override(load_config(CONFIGS / "eva02_small_p14_8xb16_in1k.py"), {"optim.lr": "3e-4", "model.depth": 2})
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="must define `config = RunConfig"):
        load_config(tmp_path / "empty.py")
