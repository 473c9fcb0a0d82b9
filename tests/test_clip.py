"""EVA-02-CLIP: parity with open_clip on random weights made by open_clip itself, in every layout.

open_clip builds the image tower through timm; the tests shrink its depth (and, in the default suite,
its width) through timm's own model arguments and the text tower through open_clip's `text_cfg`, so the
layouts (inner attention norm, sub-LN, RoPE reference grid, post-norm GELU blocks, class-token pooling)
are exactly the released ones. Full sizes run under `-m slow`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")


from eva02.clip import imagenet_templates, tokenize, zero_shot_classifier  # noqa: E402
from eva02.model.clip import CLIP_VARIANTS, ClipConfig, Eva02Clip  # noqa: E402
from eva02.weights.clip import CLIP_ZOO, get_clip, resolve_clip, save_clip  # noqa: E402
from eva02.weights.convert import CLIP_FORMATS, clip_from_ours, clip_to_ours, detect_clip_format  # noqa: E402

OPEN_CLIP_NAMES = {
    "B-16": "EVA02-B-16",
    "L-14": "EVA02-L-14",
    "L-14-336": "EVA02-L-14-336",
    "E-14": "EVA02-E-14",
    "E-14-plus": "EVA02-E-14-plus",
}


def shrink(variant: str, depth: int, width: int | None) -> ClipConfig:
    """Our config of a variant with fewer blocks (and, with `width`, narrower towers), layout unchanged."""
    cfg = CLIP_VARIANTS[variant]
    v, t = cfg.vision.replace(depth=depth), cfg.text.replace(layers=depth)
    embed = cfg.embed_dim
    if width is not None:
        ratio = v.mlp_hidden / v.dim
        v = v.replace(dim=width, heads=width // 64 or 2, mlp_hidden=int(width * ratio), num_classes=64)
        t, embed = t.replace(width=64, heads=2), 64
    return ClipConfig(v, t, embed)


def open_clip_model(variant: str, cfg: ClipConfig) -> torch.nn.Module:
    """open_clip's model of `variant`, built by open_clip at `cfg`'s depth and widths, random weights."""
    name = OPEN_CLIP_NAMES[variant]
    v = cfg.vision
    tower = {"depth": v.depth, "embed_dim": v.dim, "num_heads": v.heads, "mlp_ratio": v.mlp_hidden / v.dim}
    text = dict(open_clip.get_model_config(name)["text_cfg"])
    text.update(layers=cfg.text.layers, width=cfg.text.width, heads=cfg.text.heads)
    create = timm.create_model
    open_clip.timm_model.timm.create_model = functools.partial(create, **tower)
    try:
        model = open_clip.create_model(name, pretrained=None, text_cfg=text, embed_dim=cfg.embed_dim)
    finally:
        open_clip.timm_model.timm.create_model = create
    with torch.no_grad():  # open_clip zero-initialises biases and norms: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _load(model: torch.nn.Module, cfg: ClipConfig) -> Eva02Clip:
    ours = Eva02Clip.uninitialized(cfg)
    ours.load_state_dict(clip_to_ours(model.state_dict()), strict=True)
    return ours.eval()


TEXTS = ["a photo of a cat", "A DOG, running!", "électricité 東京 🙂", "", "x " * 100]


def check_parity(variant: str, cfg: ClipConfig, tol: float = 1e-5) -> None:
    torch.manual_seed(0)
    ref = open_clip_model(variant, cfg)
    ours = _load(ref, cfg)
    n = cfg.vision.img_size
    x = torch.randn(2, 3, n, n)
    ids = tokenize(TEXTS)
    with torch.no_grad():
        img_ref, img = ref.encode_image(x), ours.encode_image(x)
        txt_ref, txt = ref.encode_text(ids), ours.encode_text(ids)
        logits_ref = (
            ref.logit_scale.exp() * ref.encode_image(x, normalize=True) @ ref.encode_text(ids, normalize=True).T
        )
        logits = ours.logits(x, ids)
    for a, b, what in ((img, img_ref, "encode_image"), (txt, txt_ref, "encode_text"), (logits, logits_ref, "logits")):
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{variant} {what}: max error {err:.3g}"


@pytest.mark.parametrize("variant", list(OPEN_CLIP_NAMES))
def test_parity_reduced(variant: str) -> None:
    """Every released layout, 2 blocks per tower and narrow widths."""
    check_parity(variant, shrink(variant, depth=2, width=128))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["B-16", "L-14", "L-14-336"])
def test_parity_full_size(variant: str) -> None:
    check_parity(variant, CLIP_VARIANTS[variant])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["E-14", "E-14-plus"])
def test_parity_enormous_reduced_depth(variant: str) -> None:
    check_parity(variant, shrink(variant, depth=2, width=None))


def test_full_size_layouts_match_open_clip() -> None:
    """Every zoo entry's config gives open_clip's full-size tensors, name for name and shape for shape
    (both models built on the meta device: no memory, no init)."""
    for entry in CLIP_ZOO.values():
        variant = next(k for k, v in CLIP_VARIANTS.items() if v == entry.cfg)
        with torch.device("meta"):
            ref = open_clip.create_model(OPEN_CLIP_NAMES[variant], pretrained=None, device="meta")
            ours = Eva02Clip(entry.cfg)
        theirs = {k: v.shape for k, v in clip_to_ours(ref.state_dict()).items()}
        mine = {k: v.shape for k, v in ours.state_dict().items()}
        assert theirs == mine, entry.name
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


# ----------------------------------------------------------------------------- BAAI's file format
def as_eva_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's state dict renamed as BAAI's EVA-CLIP files name it (`eva_vit_model.py`), written out
    here by hand rather than through our tables, plus the RoPE buffers those files carry."""
    out = {}
    for k, v in sd.items():
        k = k.replace("visual.trunk.", "visual.")
        for a, b in (
            (".q_proj.bias", ".q_bias"),
            (".v_proj.bias", ".v_bias"),
            ("attn.norm.", "attn.inner_attn_ln."),
            ("mlp.fc1_g.", "mlp.w1."),
            ("mlp.fc1_x.", "mlp.w2."),
            ("mlp.norm.", "mlp.ffn_ln."),
        ):
            k = k.replace(a, b)
        if ".mlp.fc2." in k and "visual.blocks." in k and any(".mlp.w1." in x or ".fc1_g." in x for x in sd):
            k = k.replace(".mlp.fc2.", ".mlp.w3.")  # SwiGLU towers (B/L); the E towers keep fc1/fc2
        out[k] = v
    if any("q_bias" in k for k in out):
        out["visual.rope.freqs_cos"] = torch.ones(4, 4)
        out["visual.blocks.0.attn.rope.freqs_cos"] = torch.ones(4, 4)
    return out


@pytest.mark.parametrize("variant", ["B-16", "E-14"])
def test_official_eva_clip_file_loads_to_same_outputs(tmp_path, variant: str) -> None:
    torch.manual_seed(1)
    cfg = shrink(variant, depth=2, width=128)
    ref = open_clip_model(variant, cfg)
    official = as_eva_clip(ref.state_dict())
    assert detect_clip_format(official) == "eva_clip"
    path = tmp_path / "EVA02_CLIP.pt"
    torch.save({"state_dict": official} if variant == "B-16" else official, path)
    ours = get_clip(cfg, pretrained=path)
    x, ids = torch.randn(2, 3, cfg.vision.img_size, cfg.vision.img_size), tokenize(TEXTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(ids), ref.encode_text(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["B-16", "E-14"])
@pytest.mark.parametrize("fmt", CLIP_FORMATS)
def test_round_trip_every_format(variant: str, fmt: str) -> None:
    cfg = shrink(variant, depth=1, width=128)
    sd = Eva02Clip(cfg).state_dict()
    theirs = clip_from_ours(sd, fmt, cfg.vision)
    assert detect_clip_format(theirs) == fmt
    back = clip_to_ours(theirs)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_open_clip_files_load_by_name_and_path(tmp_path) -> None:
    """An open_clip checkpoint (`.bin` pickle and `.safetensors`) and our own file give the same model."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    cfg = shrink("B-16", depth=1, width=128)
    ref = open_clip_model("B-16", cfg)
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "open_clip_model.safetensors"))
    a = get_clip(cfg, pretrained=tmp_path / "open_clip_pytorch_model.bin")
    b = get_clip(cfg, pretrained=tmp_path / "open_clip_model.safetensors")
    save_clip(a, tmp_path / "ours.safetensors")
    c = get_clip(None, pretrained=tmp_path / "ours.safetensors")
    assert c.cfg == cfg
    for m in (b, c):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in a.state_dict().items())


def test_wrong_file_is_one_clear_error(tmp_path) -> None:
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "cls.pt")
    with pytest.raises(ValueError, match="not an EVA-02-CLIP checkpoint"):
        get_clip(CLIP_VARIANTS["test"], pretrained=tmp_path / "cls.pt")
    other = Eva02Clip(shrink("B-16", depth=1, width=128))
    save_clip(other, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="does not fit this CLIP model"):
        get_clip(shrink("B-16", depth=2, width=128), pretrained=tmp_path / "b.safetensors")


# ------------------------------------------------------------------------------- tokens and zero-shot
AWKWARD = [
    "",
    "   ",
    "a photo of a cat.",
    "Ünïcödé façade — naïve café",
    "東京タワー",
    "emoji 🐱🐶 and &amp; html",
    "punctuation!!! ??? ... ;;; (brackets) [x] {y}",
    "UPPER lower MiXeD",
    "tab\tand\nnewline",
    "don't won't it's",
    "word " * 200,
]


def test_tokenization_equals_open_clip() -> None:
    ref = open_clip.get_tokenizer("EVA02-B-16")(AWKWARD)
    ids = tokenize(AWKWARD)
    assert ids.dtype == torch.int64 and ids.shape == (len(AWKWARD), 77)
    assert torch.equal(ids, ref)
    long = ids[-1]
    assert long[-1] == 49407 and int(long.argmax()) == 76  # cut at 77 with the end token kept, and pooled


def test_missing_clip_extra_names_it(monkeypatch) -> None:
    import eva02.clip as api
    from eva02.extras import MissingExtra

    api._tokenizer.cache_clear()
    real = __import__("importlib").import_module

    def fake(name, *a, **k):
        if name.startswith("open_clip"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="open_clip")
        return real(name, *a, **k)

    monkeypatch.setattr("importlib.import_module", fake)
    with pytest.raises(MissingExtra, match=r"eva02\[clip\]"):
        tokenize("a cat")
    api._tokenizer.cache_clear()


def test_zero_shot_on_photos_equals_open_clip() -> None:
    """Real photos, random weights: our zero-shot classifier and open_clip's give the same labels and scores."""
    data = pytest.importorskip("skimage.data")
    from open_clip import build_zero_shot_classifier
    from PIL import Image

    from eva02.data.transforms import eval_transform
    from eva02.weights.zoo import Preprocess

    torch.manual_seed(3)
    cfg = shrink("B-16", depth=2, width=128)
    ref = open_clip_model("B-16", cfg)
    ours = _load(ref, cfg)
    p = Preprocess(img_size=cfg.vision.img_size)
    tf = eval_transform(p)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    x = torch.stack([tf(Image.fromarray(np.asarray(a))) for a in photos])
    names, templates = ["astronaut", "coffee", "cat", "rocket", "dog"], imagenet_templates()[:8]
    with torch.no_grad():
        head = zero_shot_classifier(ours, names, templates)
        head_ref = build_zero_shot_classifier(
            ref,
            tokenizer=open_clip.get_tokenizer("EVA02-B-16"),
            classnames=names,
            templates=[lambda c, t=t: t.format(c) for t in templates],
            num_classes_per_batch=None,
            device="cpu",
            use_tqdm=False,
        )
        probs = (ours.logit_scale.exp() * ours.encode_image(x, normalize=True) @ head).softmax(-1)
        probs_ref = (ref.logit_scale.exp() * ref.encode_image(x, normalize=True) @ head_ref).softmax(-1)
    torch.testing.assert_close(head, head_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, probs_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(probs.argmax(-1), probs_ref.argmax(-1))


def test_imagenet_prompts() -> None:
    from eva02.clip import imagenet_classnames

    names, templates = imagenet_classnames(), imagenet_templates()
    assert len(names) == 1000 and len(templates) == 80  # (two names occur twice in CLIP's list, as published)
    assert all("{}" in t for t in templates)


def test_zero_shot_classifier_refuses_bad_templates() -> None:
    model = Eva02Clip(CLIP_VARIANTS["test"])
    with pytest.raises(ValueError, match="template"):
        zero_shot_classifier(model, ["cat"], ["a photo"])
    with pytest.raises(ValueError, match="class name"):
        zero_shot_classifier(model, [], ["a {}"])


def test_a_single_string_is_one_class_name_or_template_and_tokenize_takes_only_strings() -> None:
    torch.manual_seed(0)
    model = Eva02Clip(CLIP_VARIANTS["test"]).eval()
    one = zero_shot_classifier(model, "cat", "a photo of a {}.")
    assert one.shape == (CLIP_VARIANTS["test"].embed_dim, 1)  # not three classes 'c', 'a', 't'
    torch.testing.assert_close(one, zero_shot_classifier(model, ["cat"], ["a photo of a {}."]))
    with pytest.raises(TypeError, match="item 1 is int"):
        tokenize(["a cat", 3])


def test_zoo_names_and_figures() -> None:
    assert [e.zero_shot_top1 for e in CLIP_ZOO.values()] == [74.7, 79.8, 80.4, 81.9, 82.0]
    for alias in (
        "EVA02-B-16",
        "eva02-b-16/merged2b_s8b_b131k",
        "EVA02_CLIP_B_psz16_s8B",
        "eva02_base_patch16_clip_224.merged2b_s8b_b131k",
    ):
        assert resolve_clip(alias).name == "EVA02-CLIP-B-16"
    with pytest.raises(ValueError, match="closest"):
        resolve_clip("EVA02-CLIP-B-61")
    assert math.isclose(CLIP_VARIANTS["E-14"].vision.mlp_hidden / 1792, 60 / 7)


# ------------------------------------------------------------------------------------ MIM teacher
@pytest.mark.parametrize("variant", ["B-16", "E-14"])
def test_clip_tower_teacher_equals_open_clip_teacher(variant: str) -> None:
    """Our tower as the frozen MIM teacher gives open_clip's teacher targets, without open_clip at run time."""
    from eva02.model.teacher import ClipTowerTeacher, OpenClipTeacher

    torch.manual_seed(4)
    cfg = shrink(variant, depth=2, width=128)
    ref = open_clip_model(variant, cfg)
    theirs = OpenClipTeacher(ref.visual, amp_dtype=None)
    ours = ClipTowerTeacher(_load(ref, cfg).visual, amp_dtype=None)
    assert ours.out_dim == theirs.out_dim == cfg.embed_dim
    x = torch.randn(2, 3, 196, 196)  # a student input of another size: both resize to the tower's own
    for grid in ((16, 16), (14, 14)):
        torch.testing.assert_close(ours(x, grid), theirs(x, grid), atol=1e-5, rtol=1e-5)


def test_pretrained_true_downloads_verifies_and_caches(tmp_path, monkeypatch) -> None:
    """`get_clip(name, pretrained=True)` through the real download code, from a local HTTP server."""
    import dataclasses
    import hashlib
    import http.server
    import io
    import threading

    from eva02.weights.zoo import WeightSource

    torch.manual_seed(5)
    cfg = shrink("B-16", depth=1, width=128)
    ref = open_clip_model("B-16", cfg)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    body = buf.getvalue()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a free port
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/open_clip_pytorch_model.bin"
        src = WeightSource("open_clip", url, "tiny_clip.bin", sha256=hashlib.sha256(body).hexdigest(), fmt="open_clip")
        entry = dataclasses.replace(CLIP_ZOO["EVA02-CLIP-B-16"], cfg=cfg, sources=(src,))
        monkeypatch.setenv("EVA02_HOME", str(tmp_path / "home"))
        a = get_clip(entry, pretrained=True)
        b = get_clip(entry, pretrained=True)  # from the cache: no second request
        assert len(hits) == 1 and (tmp_path / "home" / "tiny_clip.bin").is_file()
        bad = dataclasses.replace(entry, sources=(dataclasses.replace(src, sha256="0" * 64, filename="bad.bin"),))
        with pytest.raises(OSError, match="sha256"):
            get_clip(bad, pretrained=True)
        assert not (tmp_path / "home" / "bad.bin").exists()
    finally:
        httpd.shutdown()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), ref.encode_image(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(a.encode_image(x), b.encode_image(x))


def test_extract_feat_embedding_is_encode_image() -> None:
    torch.manual_seed(6)
    clip = Eva02Clip(CLIP_VARIANTS["test"]).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        (emb,) = clip.visual.extract_feat(x, out_type="embedding")
        torch.testing.assert_close(emb, clip.encode_image(x))
        first, last = clip.visual.extract_feat(x, out_type="embedding", out_indices=(0, -1))
    assert first.shape == last.shape == (2, 64) and torch.equal(last, emb)
    from eva02.model.vit import Eva02

    with pytest.raises(ValueError, match="joint-space embedding"):
        Eva02(CLIP_VARIANTS["test"].vision.replace(pool="avg", num_classes=5)).extract_feat(x, out_type="embedding")
