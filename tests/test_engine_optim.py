"""Layer-wise lr decay groups (every parameter's lr scale and weight decay), the per-step schedule against
the official cosine table, EMA arithmetic and the non-finite loss stop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eva02.engine.ema import ModelEma
from eva02.engine.optim import build_optimizer, layer_id
from eva02.engine.schedule import LrSchedule, cosine_lr
from eva02.model import VARIANTS, Eva02


def _model(depth: int = 3) -> Eva02:
    return Eva02(VARIANTS["test"].replace(depth=depth, dim=64, heads=1, mlp_hidden=96, img_size=16, patch_size=4,
                                          num_classes=5))  # fmt: skip


def expected_layer(name: str, depth: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_every_parameter_gets_its_layer_scale_and_decay() -> None:
    depth, ld, wd, lr = 3, 0.7, 0.05, 1e-3
    model = _model(depth)
    opt = build_optimizer(model, lr, wd, ld, depth)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_param) == len(names)  # each parameter in exactly one group
    for name, p in names.items():
        g = by_param[id(p)]
        lid = expected_layer(name, depth)
        assert g["lr_scale"] == pytest.approx(ld ** (depth + 1 - lid)), name
        assert g["lr"] == pytest.approx(lr * ld ** (depth + 1 - lid)), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else wd), name
    # spot checks against the official numbers: patch embedding ld^(L+1), head 1, block 0 ld^L
    assert by_param[id(model.patch_embed.proj.weight)]["lr_scale"] == pytest.approx(0.7**4)
    assert by_param[id(model.head.weight)]["lr_scale"] == 1.0
    assert by_param[id(model.blocks[0].attn.qkv.weight)]["lr_scale"] == pytest.approx(0.7**3)
    assert by_param[id(model.blocks[0].attn.q_bias)]["weight_decay"] == 0.0


def test_layer_id_ignores_wrapper_prefixes() -> None:
    assert layer_id("module.blocks.4.mlp.w3.weight", 12) == 5
    assert layer_id("_orig_mod.module.pos_embed", 12) == 0
    assert layer_id("fc_norm.weight", 12) == 13
    assert layer_id("mask_token", 24) == 0


def official_table(base, final, epochs, per_epoch, warmup_epochs, start=0.0) -> np.ndarray:
    """The official cosine table (linspace warmup including both ends, then a cosine over the rest)."""
    w = warmup_epochs * per_epoch
    warm = np.linspace(start, base, w) if w else np.array([])
    iters = np.arange(epochs * per_epoch - w)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


@pytest.mark.parametrize("warmup, min_lr, start", [(2, 0.0, 0.0), (0, 1e-6, 0.0), (1, 1e-5, 1e-6)])
def test_schedule_matches_official_table(warmup: int, min_lr: float, start: float) -> None:
    epochs, per_epoch, base = 5, 7, 1e-3
    table = official_table(base, min_lr, epochs, per_epoch, warmup, start)
    ours = [cosine_lr(i, base, epochs * per_epoch, warmup * per_epoch, min_lr, start) for i in range(len(table))]
    np.testing.assert_allclose(ours, table, rtol=1e-12, atol=1e-15)


def test_schedule_drives_every_group_and_resumes() -> None:
    model = _model(2)
    opt = build_optimizer(model, 1e-3, 0.05, 0.5, 2)
    sched = LrSchedule(opt, 1e-3, total_steps=20, warmup_steps=5)
    for _ in range(7):
        sched.step()
    lr = cosine_lr(7, 1e-3, 20, 5)
    assert lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 15)))
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])
    other = LrSchedule(build_optimizer(model, 1e-3, 0.05, 0.5, 2), 1e-3, 20, 5)
    other.load_state_dict(sched.state_dict())
    assert other.lr() == pytest.approx(lr)


def test_ema_is_the_exponential_average() -> None:
    model = _model(1)
    ema = ModelEma(model, decay=0.75)
    start = model.pos_embed.detach().clone()
    with torch.no_grad():
        model.pos_embed.add_(1.0)
    ema.update(model)
    ema.update(model)
    # e1 = .75 s + .25 (s+1); e2 = .75 e1 + .25 (s+1) = s + 1 - .75^2
    averaged = ema.state_dict()
    torch.testing.assert_close(averaged["pos_embed"], start + 1 - 0.75**2)
    assert averaged.keys() == model.state_dict().keys() and not averaged["pos_embed"].requires_grad
    # Swapped in for an evaluation, then the live weights again; a resumed average is the same average.
    live = model.pos_embed.detach().clone()
    with ema.swapped_into(model):
        torch.testing.assert_close(model.pos_embed.detach(), averaged["pos_embed"])
    assert torch.equal(model.pos_embed.detach(), live)
    other = ModelEma(_model(1), decay=0.75)
    other.load_state_dict(averaged)
    torch.testing.assert_close(other.state_dict()["pos_embed"], averaged["pos_embed"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        ModelEma(_model(2), decay=0.5).load_state_dict({**_model(2).state_dict(), "pos_embed": torch.zeros(1)})


def test_non_finite_loss_stops_with_a_clear_message(tmp_path) -> None:
    from test_engine_digits import config_text, write_digits

    from eva02.engine.config import load_config
    from eva02.engine.tasks import ClassificationTask
    from eva02.engine.train import Trainer, TrainingError

    class ExplodingLoss(torch.nn.Module):  # the loss of the 4th step and later is NaN
        def __init__(self, loss: torch.nn.Module) -> None:
            super().__init__()
            self.loss, self.calls = loss, 0

        def forward(self, model, batch):
            self.calls += 1
            return self.loss(model, batch) * (float("nan") if self.calls > 3 else 1.0)

    class Exploding(ClassificationTask):
        def build_loss(self, cfg):
            return ExplodingLoss(super().build_loss(cfg))

    root = write_digits(tmp_path / "d", limit=120)
    (tmp_path / "c.py").write_text(config_text(root, epochs=2, batch=8, global_batch=8, every_steps=2))
    trainer = Trainer(load_config(tmp_path / "c.py"), tmp_path / "wd", Exploding())
    msg = "non-finite loss at epoch 1, global step 4.*newest good checkpoint is .*step_00000002.pt"
    with pytest.raises(TrainingError, match=msg):
        trainer.fit()
    last = torch.load(tmp_path / "wd" / "checkpoints" / "last.pt", weights_only=True)
    assert last["global_step"] == 2  # the checkpoint before the bad step is kept
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_fused_adamw_by_default_with_the_same_updates() -> None:
    from eva02.engine.optim import fusable

    models = [_model(2), _model(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(models[0], 1e-2, 0.05, 0.7, 2), build_optimizer(models[1], 1e-2, 0.05, 0.7, 2, fused=False)]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults["fused"]
    start = {n: t.clone() for n, t in models[0].state_dict().items()}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for m, opt in zip(models, opts, strict=True):  # one step: later ones amplify rounding differences
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6, msg=name)
    moved = [(a - start[n]).abs().max().item() for n, a in models[0].state_dict().items()]
    assert max(moved) > 1e-3
    assert not fusable(torch.zeros(2, dtype=torch.long)) and not fusable(torch.zeros(2, device="meta"))


def test_layer_ids_under_a_backbone_prefix() -> None:
    """Segmentation, detection and MIM models keep their ViT under `backbone.`: the same layer ids."""
    from eva02.engine.optim import layer_id

    for prefix in ("", "backbone.", "module.backbone.", "backbone.vit."):
        assert layer_id(prefix + "pos_embed", 12) == 0
        assert layer_id(prefix + "patch_embed.proj.weight", 12) == 0
        assert layer_id(prefix + "blocks.0.norm1.weight", 12) == 1
        assert layer_id(prefix + "blocks.11.mlp.w3.bias", 12) == 12
    assert layer_id("decode_head.fpn_bottleneck.conv.weight", 12) == 13
    assert layer_id("backbone.fpn1.0.weight", 12) == 13


def test_poly_schedule_equals_torch_polynomial_lr() -> None:
    """After the warmup, kind='poly' is torch's PolynomialLR over the remaining steps (power 1 and 0.9)."""
    from eva02.engine.schedule import poly_lr

    for power in (1.0, 0.9):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=6e-5)
        ref = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=40, power=power)
        want = []
        for _ in range(40):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        got = [poly_lr(10 + j, 6e-5, 50, 10, power=power) for j in range(40)]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert poly_lr(0, 1.0, 50, 10, warmup_lr=0.1) == pytest.approx(0.1)  # the shared linear warmup
    sched = LrSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, 20, 0, kind="poly")
    assert sched.lr(10) == pytest.approx(0.5) and sched.lr(20) == 0.0
    with pytest.raises(ValueError, match="schedule kind"):
        LrSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, 20, 0, kind="step")
