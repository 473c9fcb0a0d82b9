"""MIM pre-training pieces: student wrapper, masked cosine loss, JAX init, teachers, and a short learning run."""

from __future__ import annotations

import functools
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eva02.data.masking import BlockMaskGenerator
from eva02.model import VARIANTS, Eva02
from eva02.model.mim import Eva02MIM, cosine_loss, init_mim_weights, masked_cosine_loss
from eva02.model.teacher import (
    Eva02Teacher,
    OpenClipTeacher,
    align_tokens,
    build_open_clip_teacher,
    import_open_clip,
)

TEST = VARIANTS["test"]  # dim 128, depth 2, heads 2, sub-LN, 56 px, patch 14 -> 4x4 grid


def make_student(seed: int = 0, target_dim: int = 32, **changes) -> Eva02MIM:
    torch.manual_seed(seed)
    return Eva02MIM(Eva02(TEST.replace(**changes)), target_dim)


def make_teacher(seed: int = 1, **changes) -> Eva02Teacher:
    torch.manual_seed(seed)
    return Eva02Teacher(Eva02(TEST.replace(**changes)))


def random_mask(b: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(b, n, generator=g).argsort(dim=1)[:, :k]
    return torch.zeros(b, n, dtype=torch.bool).scatter_(1, idx, True)


# ------------------------------------------------------------------------------------ student
def test_student_shapes_and_masked_content_is_invisible():
    mim = make_student().eval()
    x = torch.randn(3, 3, 56, 56)
    mask = random_mask(3, 16, 6)
    out = mim(x, mask)
    assert out.shape == (18, 32)
    assert mim(x, mask, all_patches=True).shape == (3, 16, 32)
    # Pixels under masked patches are replaced by the mask token: changing them changes nothing.
    y = x.clone()
    m = mask.view(3, 4, 4).repeat_interleave(14, 1).repeat_interleave(14, 2)  # (B, H, W) pixel mask
    y[m.unsqueeze(1).expand_as(y)] = 5.0
    assert torch.allclose(mim(y, mask), out, atol=1e-6)
    # ... while changing a visible patch does
    y = x.clone()
    y[:, :, ~m[0]] += 1.0
    assert not torch.allclose(mim(y, mask), out, atol=1e-3)


def test_student_rejects_bad_input():
    mim = make_student()
    with pytest.raises(ValueError, match="mask has shape"):
        mim(torch.randn(2, 3, 56, 56), torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="headless"):
        Eva02MIM(Eva02(TEST.replace(num_classes=10)), 32)


def test_cosine_loss_values():
    t = torch.randn(5, 8)
    assert cosine_loss(t * 3.0, t).item() == pytest.approx(-1.0, abs=1e-6)
    assert cosine_loss(-t, t).item() == pytest.approx(1.0, abs=1e-6)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert cosine_loss(a, b).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differs"):
        cosine_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_loss_and_gradients_only_at_masked_positions():
    mim = make_student()
    x = torch.randn(2, 3, 56, 56)
    mask = random_mask(2, 16, 6, seed=3)
    target = torch.randn(2, 16, 32)
    pred = mim(x, mask, all_patches=True)
    pred.retain_grad()
    loss = masked_cosine_loss(pred, target, mask)
    loss.backward()
    assert torch.all(pred.grad[~mask] == 0)
    assert torch.all(pred.grad[mask].abs().sum(-1) > 0)
    # the masked-only forward gives the same loss
    assert cosine_loss(mim(x, mask), target[mask]).item() == pytest.approx(loss.item(), abs=1e-6)
    # targets at visible positions do not matter
    t2 = target.clone()
    t2[~mask] = torch.randn_like(t2[~mask])
    assert masked_cosine_loss(pred.detach(), t2, mask).item() == pytest.approx(loss.item(), abs=1e-6)
    # the mask token receives gradient, the visible patches' pixels reach the loss through attention
    assert mim.mask_token.grad is not None and mim.mask_token.grad.abs().sum() > 0


def test_teacher_frozen_through_an_optimizer_step():
    mim, teacher = make_student(target_dim=128), make_teacher(patch_size=8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.net.training
    opt = torch.optim.AdamW([p for p in mim.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 56, 56)
    mask = random_mask(2, 16, 6)
    student_before = mim.lm_head.weight.detach().clone()
    target = teacher(x, (4, 4))
    assert target.shape == (2, 16, 128) and not target.requires_grad and target.dtype == torch.float32
    cosine_loss(mim(x, mask), target[mask]).backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(mim.lm_head.weight, student_before)


# --------------------------------------------------------------------------------- JAX init
def _std(t: torch.Tensor) -> float:
    return t.float().std().item()


@pytest.mark.parametrize("sub_ln", [True, False])
def test_jax_init_statistics(sub_ln):
    torch.manual_seed(0)
    cfg = TEST.replace(dim=256, heads=4, mlp_hidden=682, depth=2, sub_ln=sub_ln)
    mim = Eva02MIM(Eva02(cfg), 1024)
    D, Hd = 256, 682
    scale = math.sqrt(math.log(4)) if sub_ln else 1.0
    blk = mim.backbone.blocks[1]
    q, k, v = blk.attn.qkv.weight.chunk(3, 0)
    xavier = lambda fi, fo: math.sqrt(2.0 / (fi + fo))  # noqa: E731
    qk_std = xavier(D, D) if sub_ln else xavier(D, 3 * D)  # separate q/k/v upstream for sub-LN models
    assert _std(q) == pytest.approx(qk_std, rel=0.05)
    assert _std(k) == pytest.approx(qk_std, rel=0.05)
    assert _std(v) == pytest.approx(qk_std * scale, rel=0.05)
    w12_std = xavier(D, Hd) if sub_ln else xavier(D, 2 * Hd)
    assert _std(blk.mlp.w12.weight) == pytest.approx(w12_std * scale, rel=0.05)
    assert _std(blk.mlp.w3.weight) == pytest.approx(xavier(Hd, D) * scale, rel=0.05)
    assert _std(blk.attn.proj.weight) == pytest.approx(xavier(D, D) * scale, rel=0.05)
    assert _std(mim.lm_head.weight) == pytest.approx(xavier(D, 1024), rel=0.05)
    # no depth-dependent rescaling between blocks (unlike the fine-tuning init)
    b0 = mim.backbone.blocks[0]
    assert _std(b0.attn.proj.weight) == pytest.approx(_std(blk.attn.proj.weight), rel=0.08)
    pe = mim.backbone.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (3 * 14 * 14 + D))
    assert pe.abs().max().item() <= bound and pe.abs().max().item() > 0.95 * bound
    for t in (mim.backbone.pos_embed, mim.backbone.cls_token, mim.mask_token):
        assert t.abs().max().item() <= 0.02 and _std(t) > 0.008
    for m in mim.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert torch.all(m.bias == 0)
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(blk.attn.q_bias == 0) and torch.all(blk.attn.v_bias == 0)
    # idempotent in distribution, and callable again after other inits
    init_mim_weights(mim)
    assert _std(mim.lm_head.weight) == pytest.approx(xavier(D, 1024), rel=0.05)


# ----------------------------------------------------------------------------------- teachers
def test_align_tokens():
    B, C = 2, 5
    t = torch.randn(B, 16, C)
    assert align_tokens(t, (4, 4), (4, 4)) is t
    # area downsampling 4x4 -> 2x2 averages 2x2 windows
    out = align_tokens(t, (4, 4), (2, 2))
    fmap = t.transpose(1, 2).reshape(B, C, 4, 4)
    assert torch.allclose(out[:, 0], fmap[:, :, :2, :2].mean((2, 3)), atol=1e-6)
    # bilinear upsampling of a constant map stays constant; of a ramp stays monotone
    const = torch.ones(B, 9, C) * 3
    assert torch.allclose(align_tokens(const, (3, 3), (5, 5)), torch.full((B, 25, C), 3.0))
    ramp = torch.arange(3.0).repeat(3).view(1, 9, 1)  # columns 0, 1, 2
    up = align_tokens(ramp, (3, 3), (5, 5)).view(5, 5)
    assert torch.all(up[:, 1:] >= up[:, :-1]) and torch.allclose(up[0], up[4])
    with pytest.raises(ValueError, match="teacher grid"):
        align_tokens(t, (3, 3), (2, 2))


def test_eva02_teacher_grid_alignment():
    # a p16 teacher at 64 px (4x4) and a p8 teacher (7x7) give targets on the student's 4x4 grid
    x = torch.randn(2, 3, 56, 56)
    t8 = make_teacher(patch_size=8)
    out = t8(x, (4, 4))
    assert out.shape == (2, 16, 128)
    ref = t8.net["model"].forward_features(x)[:, 1:]  # (2, 49, 128)
    assert torch.allclose(out, align_tokens(ref, (7, 7), (4, 4)), atol=1e-6)
    # with a projection to another width
    torch.manual_seed(0)
    proj = nn.Linear(128, 48)
    tp = Eva02Teacher(Eva02(TEST), proj=proj)
    assert tp.out_dim == 48 and tp(x, (4, 4)).shape == (2, 16, 48)
    # a classifier teacher uses fc_norm per token
    torch.manual_seed(0)
    tc = Eva02Teacher(Eva02(TEST.replace(num_classes=10)))
    y = tc(x, (4, 4))
    assert torch.allclose(y.mean(-1), torch.zeros(2, 16), atol=1e-5)  # LayerNorm with weight 1 / bias 0


class _FakeTimmModel(nn.Module):
    """The shape of open_clip's TimmModel: a timm trunk whose head is the CLIP projection, empty `head`."""

    def __init__(self, trunk: nn.Module, image_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential()
        self.image_size = (image_size, image_size)


def _fake_open_clip(trunk: nn.Module, image_size: int) -> types.ModuleType:
    mod = types.ModuleType("open_clip")
    calls = []

    def create_model(name, pretrained=None):
        calls.append((name, pretrained))
        if name != "EVA02-B-16":
            raise RuntimeError(f"Model config for {name} not found.")
        return types.SimpleNamespace(visual=_FakeTimmModel(trunk, image_size))

    mod.create_model = create_model
    mod.calls = calls
    return mod


def test_open_clip_teacher_with_fake_module(monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # a small EVA-02 CLIP-style trunk: patch 16 at 64 px (4x4 grid), token pooling, head = projection to 24
    trunk = timm.create_model(
        "eva02_tiny_patch14_224",
        pretrained=False,
        img_size=64,
        patch_size=16,
        depth=2,
        num_classes=24,
        global_pool="token",
    )
    fake = _fake_open_clip(trunk, 64)
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    teacher = build_open_clip_teacher("EVA02-B-16", "/data/eva02_clip_b16.bin")
    assert fake.calls == [("EVA02-B-16", "/data/eva02_clip_b16.bin")]
    assert isinstance(teacher, OpenClipTeacher) and teacher.out_dim == 24 and teacher.img_size == (64, 64)
    x = torch.randn(2, 3, 56, 56)  # student input: 4x4 grid of p14; the teacher sees it resized to 64 px
    out = teacher(x, (4, 4))
    assert out.shape == (2, 16, 24)
    with torch.no_grad():
        xr = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False)
        ref = trunk.head(trunk.forward_features(xr)[:, 1:])
    assert torch.allclose(out, ref, atol=1e-5)
    # a student grid of 8x8 gets bilinear-upsampled targets
    assert teacher(x, (8, 8)).shape == (2, 64, 24)
    assert not any(p.requires_grad for p in trunk.parameters())
    with pytest.raises(ValueError, match="could not build teacher"):
        build_open_clip_teacher("EVA99-X", "")


def test_open_clip_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ModuleNotFoundError, match=r"open_clip_torch: pip install 'eva02\[mim\]'"):
        import_open_clip()
    with pytest.raises(ValueError, match="not a timm ViT trunk"):
        OpenClipTeacher(nn.Linear(2, 2))


# ------------------------------------------------------------------------------ learning (CPU)
@functools.cache
def _sources() -> tuple[torch.Tensor, ...]:
    """scikit-image's colour photos as (3, H, W) floats in [0, 1], at most 256 px on the short side."""
    skdata = pytest.importorskip("skimage.data")
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
    out = []
    for name in names:
        img = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).float()[None] / 255
        scale = 256 / min(img.shape[-2:])
        out.append(F.interpolate(img, scale_factor=scale, mode="area")[0] if scale < 1 else img[0])
    return tuple(out)


def _photos(n: int, size: int, seed: int) -> torch.Tensor:
    """`n` random crops (flipped at random) of scikit-image's photos, CLIP-normalised, (n, 3, size, size)."""
    imgs = _sources()
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    out = []
    for _ in range(n):
        img = imgs[int(torch.randint(len(imgs), (1,), generator=g))]
        H, W = img.shape[1:]
        s = int(torch.randint(min(H, W) // 3, min(H, W) + 1, (1,), generator=g))
        top = int(torch.randint(0, H - s + 1, (1,), generator=g))
        left = int(torch.randint(0, W - s + 1, (1,), generator=g))
        crop = F.interpolate(img[None, :, top : top + s, left : left + s], size=(size, size), mode="area")[0]
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(-1)
        out.append((crop - mean) / std)
    return torch.stack(out)


def train(student, teacher, masks, opt, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        x = _photos(16, 112, seed=step)
        m = masks.batch(16)
        loss = cosine_loss(student(x, m), teacher(x, (8, 8))[m])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        opt.step()
        losses.append(loss.item())
    return losses


def test_cosine_loss_falls_on_real_photos():
    """A small student learns a different small teacher's (p16 vs p14) patch features on real photos."""
    torch.manual_seed(0)
    student = Eva02MIM(Eva02(TEST.replace(img_size=112, patch_grad_scale=0.1)), 64)
    torch.manual_seed(123)
    tcfg = TEST.replace(img_size=128, patch_size=16)  # sees the 112 px crops as 7x7 patches, the student 8x8
    teacher = Eva02Teacher(Eva02(tcfg), proj=nn.Linear(128, 64))
    masks = BlockMaskGenerator((8, 8), num_masking=26, min_num=4, seed=0)
    # lr 2e-3 for 60 steps ends where 1e-3 for 120 steps did (held-out loss about -0.8 against a -0.52 baseline).
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    eval_x = _photos(32, 112, seed=99)
    eval_m = masks.batch(32)
    eval_t = teacher(eval_x, (8, 8))

    def eval_loss() -> float:
        student.eval()
        with torch.no_grad():
            loss = cosine_loss(student(eval_x, eval_m), eval_t[eval_m]).item()
        student.train()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a shared machine
    try:
        start = eval_loss()
        losses = train(student, teacher, masks, opt, 60)
        end = eval_loss()
        # Context-free baseline: predict the mean (normalised) target of each position, seen over training crops.
        seen = torch.cat([teacher(_photos(16, 112, seed=s), (8, 8)) for s in range(10)])
        pos_mean = F.normalize(seen, dim=-1).mean(0).expand(32, -1, -1)  # (32, 64, 64)
        baseline = cosine_loss(pos_mean[eval_m], eval_t[eval_m]).item()
    finally:
        torch.set_num_threads(threads)
    print(f"held-out masked cosine loss {start:.3f} -> {end:.3f} (per-position mean baseline {baseline:.3f})")
    assert end < start - 0.3, (start, end)
    assert end < baseline - 0.15, (end, baseline)  # the student reads the visible context, not only positions
    assert sum(losses[-20:]) / 20 < sum(losses[:3]) / 3 - 0.3


# ---------------------------------------------------------------------------- through the engine
def _write_photos(folder, n: int, size: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    src = _sources()
    for i in range(n):
        img = src[i % len(src)]
        top = int(torch.randint(0, img.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(0, img.shape[2] - size + 1, (1,), generator=g))
        a = (img[:, top : top + size, left : left + size].permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(a).save(folder / f"img_{i:03d}.png")


def test_pretrain_through_engine_then_fine_tune(tmp_path):
    """MIM run through the training loop (plain image folder, a teacher checkpoint file), exported, fine-tuned."""
    from eva02.engine.config import DataCfg, MimCfg, ModelCfg, OptimCfg, RunConfig, ScheduleCfg, TrainCfg
    from eva02.engine.runlog import read_metrics
    from eva02.engine.tasks import ClassificationTask, MimTask, build_eva02
    from eva02.engine.testing import export_backbone
    from eva02.engine.train import Trainer
    from eva02.weights.load import get_model, save_checkpoint

    _write_photos(tmp_path / "photos" / "train", 16, 96, seed=0)
    torch.manual_seed(5)
    teacher_file = save_checkpoint(Eva02(TEST.replace(patch_size=8)), tmp_path / "teacher.safetensors")
    data = dict(val_split="", workers=0, persistent_workers=False, pin_memory=False, randaug_n=0)
    cfg = RunConfig(
        model=ModelCfg(name="test", num_classes=0, img_size=56, drop_path=0.0, patch_grad_scale=0.1),
        data=DataCfg(root=str(tmp_path / "photos"), batch_size=8, rrc_scale=(0.2, 1.0), **data),
        optim=OptimCfg(lr=2e-3, layer_decay=1.0, betas=(0.9, 0.98), eps=1e-6, clip_grad=3.0, global_batch=8),
        schedule=ScheduleCfg(epochs=4, warmup_epochs=0.5, min_lr=1e-5),
        train=TrainCfg(log_every=1, seed=0),
    )
    mim = MimCfg(teacher_kind="eva02", teacher_name=str(teacher_file), teacher_pretrained="", target_dim=0)
    task = MimTask(mim)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, tmp_path / "pre", task)
        assert trainer.task.masks(cfg).num_masking == 7  # 105/256 of the 4x4 grid
        teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in read_metrics(tmp_path / "pre") if r.get("kind") == "train"]
    assert len(losses) == 8 and all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in losses)
    assert all(torch.equal(v, teacher_before[k]) for k, v in task.teacher.state_dict().items())

    # The pre-trained backbone, exported, loads as a headless model and initialises a fine-tune run.
    last = tmp_path / "pre" / "checkpoints" / "last.pt"
    out = export_backbone(last, tmp_path / "pre_backbone.safetensors")
    backbone = get_model(None, pretrained=out)
    assert not backbone.is_classifier and backbone.cfg.patch_grad_scale == 0.1
    trained = unwrap_backbone(trainer.model)
    for k, v in trained.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v.cpu()), k

    for c in ("cat", "rocket"):
        _write_photos(tmp_path / "cls" / "train" / c, 4, 96, seed=len(c))
    ft = RunConfig(
        model=ModelCfg(name="test", num_classes=2, img_size=56, init=str(out), drop_path=0.0),
        data=DataCfg(root=str(tmp_path / "cls"), batch_size=4, **data),
        optim=OptimCfg(lr=1e-3, layer_decay=0.9, global_batch=4),
        schedule=ScheduleCfg(epochs=1, warmup_epochs=0.0),
        train=TrainCfg(log_every=1, max_steps=2),
    )
    clf = build_eva02(ft)
    assert torch.equal(clf.blocks[1].attn.qkv.weight, backbone.blocks[1].attn.qkv.weight)
    Trainer(ft, tmp_path / "ft", ClassificationTask()).fit()
    ft_losses = [r["loss"] for r in read_metrics(tmp_path / "ft") if r.get("kind") == "train"]
    assert len(ft_losses) == 2 and all(math.isfinite(v) for v in ft_losses)


def unwrap_backbone(model: nn.Module) -> Eva02:
    from eva02.engine.parallel import unwrap

    return unwrap(model).backbone


@pytest.mark.parametrize(
    "size, lr, batch, epochs, drop_path",
    [("tiny", 3e-3, 4000, 240, 0.0), ("small", 3e-3, 4000, 240, 0.0), ("base", 1.5e-3, 2048, 150, 0.0),
     ("large", 1.5e-3, 2048, 150, 0.1)],
)  # fmt: skip
def test_pretrain_configs_follow_the_official_recipe(size, lr, batch, epochs, drop_path):
    from pathlib import Path

    from eva02.engine.config import load_run, override
    from eva02.engine.tasks import MimTask, task_for

    path = Path(__file__).parents[1] / "configs" / "eva02" / f"eva02_{size}_p14_mim_in21k.py"
    c, task = load_run(path)
    assert task is None and c.train.task == "mim"  # the loop takes the task train.task names
    task = task_for(c)
    assert isinstance(task, MimTask)
    assert (c.model.name, c.model.num_classes, c.model.img_size, c.model.drop_path) == (size, 0, 224, drop_path)
    assert c.model.patch_grad_scale == 0.1
    o, s = c.optim, c.schedule
    assert (o.lr, o.global_batch, o.betas, o.eps, o.weight_decay, o.clip_grad, o.layer_decay) == (
        lr, batch, (0.9, 0.98), 1e-6, 0.05, 3.0, 1.0
    )  # fmt: skip
    assert (s.epochs, s.warmup_epochs, s.min_lr) == (epochs, 1.0, 1e-5)
    assert c.data.rrc_scale == (0.2, 1.0) and c.data.randaug_n == 0 and c.data.mixup == 0 and c.data.val_split == ""
    m = task.settings(c)
    assert (m.teacher_kind, m.teacher_name) == ("open_clip", "EVA01-g-14")
    # the teacher is a checked config section: overridable from the command line
    local = override(c, {"mim.teacher_kind": "eva02", "mim.teacher_name": "teacher.safetensors"})
    assert task.settings(local).teacher_name == "teacher.safetensors"
    with pytest.raises(ValueError, match="teacher_kind"):
        override(c, {"mim.teacher_kind": "bogus"})
    gen = task.masks(c)
    assert (gen.height, gen.num_masking, gen.min_num, gen.max_num) == (16, 105, 16, 105)
