"""Visual explanations (eva02/explain.py) and `eva02 explain`: the recomputed attention equals what the
blocks' SDPA computes (float64), rollout on known attentions, Grad-CAM against a plain autograd
computation, the drawings, and the command's outputs and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from eva02 import explain as ex
from eva02.cli import main
from eva02.model import fast
from eva02.model.config import VARIANTS
from eva02.model.vit import Eva02
from eva02.weights.load import save_checkpoint
from eva02.weights.zoo import Preprocess

CFG = VARIANTS["test"]  # 2 blocks, 2 heads of 64, 56 px: a 4 x 4 grid


def classifier(seed: int = 0, num_classes: int = 10) -> Eva02:
    torch.manual_seed(seed)
    model = Eva02(CFG.replace(num_classes=num_classes)).eval()
    with torch.no_grad():  # non-zero biases and a head far from its tiny init, so every term counts
        for blk in model.blocks:
            blk.attn.q_bias.normal_(0, 0.5)
            blk.attn.v_bias.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.5)
    return model


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, CFG.img_size, CFG.img_size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- attention
def test_attention_probabilities_reproduce_the_blocks_sdpa_in_float64() -> None:
    model = classifier().double()
    x = images().double()
    inputs, before_proj = [], []
    hooks = [blk.register_forward_pre_hook(lambda m, a: inputs.append((a[0], a[1]))) for blk in model.blocks]
    hooks += [blk.attn.proj.register_forward_pre_hook(lambda m, a: before_proj.append(a[0])) for blk in model.blocks]
    with torch.no_grad(), fast.use(None):  # the reference layers call attn.proj as a module
        model(x)
    for h in hooks:
        h.remove()
    default_form = ex.attention_maps(model, x, fuse_heads=False)  # whatever form the blocks choose
    assert len(inputs) == len(before_proj) == len(default_form) == CFG.depth
    for blk, (tokens, rope), out, probs_fast in zip(model.blocks, inputs, before_proj, default_form, strict=True):
        probs = ex.block_attention(blk, tokens, rope)  # (B, h, T, T)
        B, T, D = tokens.shape
        assert probs.shape == (B, CFG.heads, T, T) and probs.dtype == torch.float64
        torch.testing.assert_close(probs.sum(-1), torch.ones(B, CFG.heads, T, dtype=torch.float64))
        v = torch.nn.functional.linear(blk.norm1(tokens), blk.attn.qkv.weight[2 * D :], blk.attn.v_bias)  # (B, T, D)
        v = v.view(B, T, CFG.heads, CFG.head_dim).transpose(1, 2)  # (B, h, T, hd)
        mixed = (probs @ v).transpose(1, 2).reshape(B, T, D)
        torch.testing.assert_close(mixed, out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(probs_fast, probs, rtol=1e-10, atol=1e-12)
    fused = ex.attention_maps(model, x)
    torch.testing.assert_close(fused[0], default_form[0].mean(1))


# ------------------------------------------------------------------------------------- rollout
def test_rollout_of_identity_or_uniform_attention_is_a_uniform_map() -> None:
    B, T, L = 2, 17, 3
    identity = ex.rollout([torch.eye(T).expand(B, T, T)] * L)
    torch.testing.assert_close(identity, torch.eye(T).expand(B, T, T))  # each token draws only on itself
    cls_row = identity[:, 0, 1:]
    assert (cls_row == cls_row[:, :1]).all()
    assert (ex.normalise(cls_row.reshape(B, 4, 4)) == 0).all()  # a constant map: no spot singled out, no NaN
    uniform = ex.rollout([torch.full((B, T, T), 1.0 / T)] * L)[:, 0, 1:]
    torch.testing.assert_close(uniform, uniform[:, :1].expand_as(uniform))
    assert (uniform > 0).all()


def test_rollout_is_the_product_of_the_half_identity_mixes() -> None:
    torch.manual_seed(0)
    T = 5
    attn = [torch.softmax(torch.randn(1, T, T, dtype=torch.float64), -1) for _ in range(3)]
    mixes = [0.5 * a[0] + 0.5 * torch.eye(T, dtype=torch.float64) for a in attn]  # rows of A sum to 1
    torch.testing.assert_close(ex.rollout(attn)[0], mixes[2] @ mixes[1] @ mixes[0])
    torch.testing.assert_close(ex.rollout(attn).sum(-1), torch.ones(1, T, dtype=torch.float64))


def test_attention_rollout_of_a_model_attending_evenly_is_uniform() -> None:
    model = classifier()
    with torch.no_grad():
        for blk in model.blocks:  # q = k = 0: every token attends to all tokens alike
            blk.attn.qkv.weight[: 2 * CFG.dim].zero_()
            blk.attn.q_bias.zero_()
    maps = ex.attention_rollout(model, images())
    assert maps.shape == (2, CFG.grid, CFG.grid)
    torch.testing.assert_close(maps, maps[:, :1, :1].expand_as(maps))
    busy = ex.attention_rollout(classifier(), images())
    assert (busy.flatten(1).std(1) > 1e-4).all()  # and a model with real attention singles out patches


# ------------------------------------------------------------------------------------ Grad-CAM
def plain_gradcam(model: Eva02, x: torch.Tensor, target: int, block: int) -> torch.Tensor:
    """Grad-CAM by the book: one forward pass with a hook, one backward pass through all of it."""
    acts = []
    handle = model.blocks[block].register_forward_hook(lambda m, a, out: acts.append(out))
    with fast.use(None):
        logits = model(x.requires_grad_(True))
    handle.remove()
    (grad,) = torch.autograd.grad(logits[:, target].sum(), acts[0])
    cam = (acts[0][:, 1:] * grad[:, 1:].mean(1, keepdim=True)).sum(-1).clamp_min(0)
    return cam.detach().reshape(x.shape[0], CFG.grid, CFG.grid)


@pytest.mark.parametrize("block", [-1, 0])
def test_gradcam_equals_the_plain_computation(block: int) -> None:
    model = classifier().double()
    x = images().double()
    maps, classes = ex.gradcam(model, x, target=3, block=block)
    assert maps.shape == (2, CFG.grid, CFG.grid) and classes.tolist() == [3, 3]
    torch.testing.assert_close(maps, plain_gradcam(model, x.clone(), 3, block % CFG.depth), rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated in the model


def test_gradcam_is_non_negative_follows_the_class_and_defaults_to_the_top_class() -> None:
    model = classifier()
    x = images(3)
    maps, classes = ex.gradcam(model, x)
    with torch.no_grad():
        assert classes.tolist() == model(x).argmax(-1).tolist()
    assert maps.shape == (3, CFG.grid, CFG.grid) and (maps >= 0).all() and (maps.flatten(1).amax(1) > 0).all()
    other = (classes + 1) % 10
    maps_other, used = ex.gradcam(model, x, target=other)
    assert used.tolist() == other.tolist()
    assert not torch.allclose(ex.normalise(maps), ex.normalise(maps_other), atol=1e-3)
    with torch.inference_mode():  # callers in inference mode get the same maps
        torch.testing.assert_close(ex.gradcam(model, x)[0], maps)


def test_gradcam_refuses_headless_models_and_bad_targets() -> None:
    with pytest.raises(ValueError, match="no classifier head"):
        ex.gradcam(Eva02(CFG).eval(), images(1))
    model = classifier()
    with pytest.raises(ValueError, match="target class 10 is out of range"):
        ex.gradcam(model, images(1), target=10)
    with pytest.raises(ValueError, match="one per image"):
        ex.gradcam(model, images(3), target=[1, 2])
    with pytest.raises(ValueError, match="gradcam only"):
        ex.explain(model, images(1), "attention-rollout", target=1)
    with pytest.raises(ValueError, match="unknown explanation method"):
        ex.explain(model, images(1), "lime")


# ------------------------------------------------------------------------------------- drawings
def test_model_view_overlay_and_explain_image() -> None:
    photo = Image.fromarray(data.chelsea())  # 451 x 300
    pre = Preprocess(img_size=56, crop_pct=0.875)
    view = ex.model_view(photo, pre)
    side = round(300 * 56 / int(56 / 0.875))
    assert view.size == (side, side)
    assert ex.model_view(photo, Preprocess(img_size=56, crop_mode="squash")).size == photo.size
    hot_corner = np.zeros((4, 4), np.float32)
    hot_corner[0, 0] = 1.0
    assert ex.overlay(view, hot_corner).size == view.size
    grey = Image.new("RGB", (200, 120), (128, 128, 128))
    drawn = np.asarray(ex.overlay(grey, hot_corner, alpha=0.6), dtype=np.int32)  # (120, 200, 3)
    assert drawn.shape == (120, 200, 3)
    hot, cold = drawn[:8, :8].mean((0, 1)), drawn[-8:, -8:].mean((0, 1))  # RGB
    assert hot[0] > hot[2] + 50 and cold[2] > cold[0] + 20  # the hot corner red, the cold one blue
    assert ex.overlay(view, hot_corner, alpha=0.0).tobytes() == view.convert("RGB").tobytes()
    assert max(ex.overlay(photo, hot_corner, max_side=128).size) == 128
    res = ex.explain_image(classifier(), photo, "gradcam", target=4)
    assert res.target == 4 and res.heat.shape == (4, 4) and res.heat.max() == pytest.approx(1.0)
    assert res.image.size == ex.model_view(photo, Preprocess(img_size=56)).size


# -------------------------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    save_checkpoint(classifier(num_classes=1000), root / "cls.safetensors", name="test-cls")
    save_checkpoint(Eva02(CFG), root / "headless.safetensors", name="test-headless")
    Image.fromarray(data.chelsea()).save(root / "cat.png")
    Image.fromarray(data.coffee()).save(root / "coffee.jpg", quality=90)
    (root / "junk.png").write_bytes(b"not an image at all")
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, list[str]]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def test_explain_writes_one_png_per_image_and_the_json(files, capsys) -> None:
    root, out = files, files / "maps"
    ck = root / "cls.safetensors"
    rc, stdout, err = run_cli(capsys, "explain", root / "cat.png", root / "coffee.jpg", "--checkpoint", ck, "-o", out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cat_rollout.png", "coffee_rollout.png"]
    assert stdout.splitlines()[0] == f"{root / 'cat.png'} -> {out / 'cat_rollout.png'}"
    with Image.open(out / "coffee_rollout.png") as im:
        assert im.format == "PNG" and im.size == (400, 400)  # coffee.jpg is 600 x 400: its centre square
    rc, stdout, err = run_cli(
        capsys, "explain", root / "cat.png", "--checkpoint", ck, "-o", out, "--method", "gradcam",
        "--target-class", "7", "--json",
    )  # fmt: skip
    assert rc == 0, err
    rec = json.loads(stdout)
    assert rec["out"] == str(out / "cat_gradcam.png") and rec["method"] == "gradcam"
    assert rec["target_label"] == 7 and rec["target_class"] == "cock" and rec["grid"] == [4, 4]
    heat = np.array(rec["map"])
    assert heat.shape == (4, 4) and heat.min() == 0.0 and heat.max() == 1.0


def test_explain_never_replaces_a_drawing_without_force(files, capsys) -> None:
    root, out = files, files / "again"
    argv = ["explain", root / "cat.png", "--checkpoint", root / "cls.safetensors", "-o", out]
    assert run_cli(capsys, *argv)[0] == 0
    drawing = out / "cat_rollout.png"
    drawing.write_bytes(b"mine")
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and len(err) == 1 and "already exists; pass --force" in err[0]
    assert drawing.read_bytes() == b"mine"
    assert run_cli(capsys, *argv, "--force")[0] == 0
    with Image.open(drawing) as im:
        assert im.format == "PNG"


def test_explain_errors_are_one_line_and_write_nothing(files, capsys) -> None:
    root = files
    ck, headless = root / "cls.safetensors", root / "headless.safetensors"
    cases = [
        (["explain", root / "cat.png", root / "junk.png", "--checkpoint", ck, "-o", root / "o1"],
         "cannot load image '" + str(root / "junk.png") + "': not an image format PIL can read"),
        (["explain", root / "cat.png", "--checkpoint", headless, "-o", root / "o2", "--method", "gradcam"],
         "Grad-CAM explains a class: use --method attention-rollout"),
        (["explain", root / "cat.png", "--checkpoint", ck, "-o", root / "o3", "--target-class", "2"],
         "--target-class applies to --method gradcam only"),
        (["explain", root / "cat.png", "--checkpoint", ck, "-o", root / "o4", "--method", "gradcam",
          "--target-class", "1000"], "--target-class 1000 is out of range"),
        (["explain", root / "none.png", "--checkpoint", ck, "-o", root / "o5"], "no such file or folder"),
    ]  # fmt: skip
    for argv, expected in cases:
        rc, stdout, err = run_cli(capsys, *argv)
        assert rc == 2 and len(err) == 1 and expected in err[0], (argv, err)
        out = root / argv[argv.index("-o") + 1]
        assert not out.exists() or not any(out.iterdir()), argv
    with pytest.raises(SystemExit) as e:  # argparse's own check, in the house format
        main(["explain", str(root / "cat.png"), "--checkpoint", str(ck), "-o", str(root / "o6"), "--method", "lime"])
    assert e.value.code == 2


def test_attention_of_post_norm_towers_without_rope() -> None:
    """The CLIP-E layout: attention reads the stream itself (norms after the branches), no RoPE."""
    import torch

    from eva02.explain import attention_maps, attention_rollout
    from eva02.model.config import CLIP_VARIANTS
    from eva02.model.vit import Eva02

    torch.manual_seed(0)
    cfg = CLIP_VARIANTS["E-14"].vision.replace(dim=64, heads=2, depth=2, mlp_hidden=128, img_size=56)
    model = Eva02(cfg).double().eval()
    seen = []
    hooks = [blk.attn.proj.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for blk in model.blocks]
    inputs = []
    hooks += [blk.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for blk in model.blocks]
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    probs = attention_maps(model, x, fuse_heads=False)
    for h in hooks:
        h.remove()
    for blk, p, a_in, merged in zip(model.blocks, probs, inputs, seen, strict=True):
        B, T, D = a_in.shape
        v = torch.nn.functional.linear(a_in, blk.attn.qkv.weight[2 * D :], blk.attn.v_bias)
        v = v.view(B, T, blk.attn.heads, -1).transpose(1, 2)
        torch.testing.assert_close((p.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, D), merged)
    assert attention_rollout(model, x).shape == (2, 4, 4)
