"""Training options beyond the plain loop: bf16 autocast, fp16 loss scaling, gradient checkpointing,
clipping, mixup/cutmix, EMA and the official patch-embedding stop-gradient, on a few CPU steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine_digits import config_text, write_digits

from eva02.engine.config import load_config, override
from eva02.engine.train import Trainer


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"), limit=100)


def _fit(tmp_path: Path, root: Path, **changes) -> Trainer:
    (tmp_path / "c.py").write_text(config_text(root, epochs=1, batch=8, global_batch=16, ema=True))
    trainer = Trainer(override(load_config(tmp_path / "c.py"), changes), tmp_path / "wd")
    trainer.fit()
    return trainer


@pytest.mark.parametrize(
    "changes",
    [
        {"train.amp": "bf16", "train.grad_checkpointing": True, "optim.clip_grad": 1.0},
        {"train.amp": "fp16", "data.mixup": 0.8, "data.cutmix": 1.0, "data.reprob": 0.25},
    ],
)
def test_options_train_and_move_weights(tmp_path: Path, digits: Path, changes: dict) -> None:
    torch.manual_seed(0)
    trainer = _fit(tmp_path, digits, **changes)
    model = trainer.model
    assert trainer.global_step == 5 and model.grad_checkpointing == changes.get("train.grad_checkpointing", False)
    torch.manual_seed(0)  # the run seeds train.seed=0 before building the model: the same initial weights
    init = type(model)(model.cfg).state_dict()
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, init[k])]
    assert {"head.weight", "patch_embed.proj.weight", "blocks.1.mlp.w3.weight"} <= set(moved)
    ema_diff = (trainer.ema.state_dict()["head.weight"] - model.head.weight).abs().max()
    assert torch.isfinite(ema_diff) and ema_diff > 0  # the average lags the live weights


def test_patch_embedding_stop_gradient(tmp_path: Path, digits: Path) -> None:
    torch.manual_seed(0)
    trainer = _fit(tmp_path, digits, **{"model.patch_grad_scale": 0.0, "optim.weight_decay": 0.0})
    model = trainer.model
    torch.manual_seed(0)
    init = type(model)(model.cfg).state_dict()
    # Detached patch embedding (official fine-tuning): its weights never change; everything else trains.
    torch.testing.assert_close(model.patch_embed.proj.weight, init["patch_embed.proj.weight"], atol=0, rtol=0)
    assert not torch.equal(model.pos_embed, init["pos_embed"])
