"""End-to-end tests of `eva02 predict` and `eva02 features` through `eva02.cli.main`, with saved random models."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from eva02.cli import main
from eva02.data.images import load_image
from eva02.data.transforms import eval_transform, preprocess_for_model
from eva02.inference import inference_model
from eva02.model.config import VARIANTS
from eva02.model.vit import Eva02

load = pytest.importorskip("eva02.weights.load")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two saved random models and a folder of real photos: a/cat.png and b/cat.png share a name."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cls = Eva02(VARIANTS["test"].replace(num_classes=1000))
    with torch.no_grad():
        cls.head.weight.normal_(0, 0.5)  # distinct top classes per photo
    load.save_checkpoint(cls, root / "cls.safetensors")
    load.save_checkpoint(Eva02(VARIANTS["test"]), root / "headless.safetensors")
    imgs = root / "imgs"
    (imgs / "a").mkdir(parents=True)
    (imgs / "b").mkdir()
    Image.fromarray(data.chelsea()).save(imgs / "a" / "cat.png")
    Image.fromarray(data.astronaut()).save(imgs / "b" / "cat.png")
    Image.fromarray(data.coffee()).save(imgs / "coffee.jpg", quality=90)
    return root, imgs


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


GOOD = ["a/cat.png", "b/cat.png", "coffee.jpg"]


def test_predict_table(files, capsys):
    root, imgs = files
    rc, out, err = run_cli(capsys, "predict", str(imgs), "--checkpoint", str(root / "cls.safetensors"), "--topk", "3")
    assert rc == 0, err
    blocks = out.strip().split("\n")
    assert len(blocks) == 3 * 4  # a header line and 3 ranked lines per image
    model = load.load_model(root / "cls.safetensors")
    for n, rel in enumerate(GOOD):
        header, first = blocks[4 * n], blocks[4 * n + 1]
        assert header == str(imgs / rel)
        ref = inference_model(model, imgs / rel)
        assert first.split()[0] == "1." and first.endswith(f"({ref['pred_label']})")
        assert ref["pred_class"] in first and f"{ref['pred_score']:.4f}" in first


def test_predict_json_matches_api(files, capsys):
    root, imgs = files
    args = ["predict", str(imgs / "coffee.jpg"), str(imgs / "a"), "--checkpoint", str(root / "cls.safetensors")]
    rc, out, err = run_cli(capsys, *args, "--json", "-k", "2")
    assert rc == 0, err
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["file"] for r in recs] == [str(imgs / "coffee.jpg"), str(imgs / "a" / "cat.png")]
    model = load.load_model(root / "cls.safetensors")
    for r in recs:
        ref = inference_model(model, r["file"], topk=2)
        assert r["pred_label"] == ref["pred_label"] and r["pred_class"] == ref["pred_class"]
        assert r["pred_score"] == pytest.approx(ref["pred_score"], abs=1e-5)
        assert [t["label"] for t in r["topk"]] == [lab for lab, _, _ in ref["topk"]]
    # several worker processes, one image per batch: the same records
    rc, out2, _ = run_cli(capsys, *args, "--json", "-k", "2", "--workers", "2", "--batch-size", "1")
    assert rc == 0 and out2 == out


def test_predict_out_writes_drawings(files, capsys, tmp_path):
    root, imgs = files
    out_dir = tmp_path / "drawn"
    rc, _, err = run_cli(
        capsys, "predict", str(imgs), "--checkpoint", str(root / "cls.safetensors"), "--out", str(out_dir)
    )
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a__cat_topk.png", "b__cat_topk.png", "coffee_topk.jpg"]
    for p in out_dir.iterdir():
        with Image.open(p) as im:
            assert im.width == 512 and im.height > 512 * 300 // 451 + 5 * 20  # photo plus 5 bars
    assert Image.open(out_dir / "coffee_topk.jpg").format == "JPEG"


def test_predict_bad_file_skipped_with_warning(files, capsys, tmp_path):
    root, imgs = files
    d = tmp_path / "mixed"
    d.mkdir()
    Image.fromarray(data.coffee()).save(d / "1_good.png")
    (d / "2_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    Image.fromarray(data.chelsea()).save(d / "3_good.png")
    rc, out, err = run_cli(capsys, "predict", str(d), "--checkpoint", str(root / "cls.safetensors"), "--json")
    assert rc == 1
    assert [json.loads(line)["file"] for line in out.splitlines()] == [str(d / "1_good.png"), str(d / "3_good.png")]
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(d / "2_bad.jpg") in warnings[0]
    assert "1 of 3 images failed" in err and "Traceback" not in err


def test_predict_demo(files, capsys):
    root, _ = files
    rc, out, err = run_cli(capsys, "predict", "--demo", "--checkpoint", str(root / "cls.safetensors"), "-k", "1")
    assert rc == 0, err
    assert out.splitlines()[0].endswith("demo.jpg") and len(out.splitlines()) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--checkpoint", "{root}/missing.safetensors", "{imgs}"],
            "--checkpoint file '.*missing.safetensors' does not exist",
        ),
        (["--model", "eva02-gigantic", "{imgs}"], "unknown model name 'eva02-gigantic'"),
        (["--checkpoint", "{root}/headless.safetensors", "{imgs}"], "without a classifier.*`eva02 features`"),
        (["--checkpoint", "{root}/cls.safetensors"], "no images given"),
        (["--checkpoint", "{root}/cls.safetensors", "{root}/empty"], "no image files found"),
        (["--checkpoint", "{root}/cls.safetensors", "{imgs}", "--topk", "0"], "--topk must be 1 or more, got 0"),
        (["{imgs}"], "give -m/--model NAME"),
    ],
)
def test_predict_errors_one_line_exit_2(files, capsys, argv, message):
    root, imgs = files
    (root / "empty").mkdir(exist_ok=True)
    rc, out, err = run_cli(capsys, "predict", *[a.format(root=root, imgs=imgs) for a in argv])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eva02 predict: error: ")
    assert re.search(message, lines[0]), lines[0]


# ---------------------------------------------------------------------------------------- features
def _reference_features(ckpt, paths, out_type, out_indices):
    model = load.load_model(ckpt)
    tf = eval_transform(preprocess_for_model(model))
    x = torch.stack([tf(load_image(p)) for p in paths])
    with torch.no_grad():
        feats = model.extract_feat(x, out_type=out_type, out_indices=out_indices)
    return (feats[0] if len(feats) == 1 else torch.stack(feats, 1)).numpy()


def test_features_npy(files, capsys, tmp_path):
    root, imgs = files
    out = tmp_path / "f.npy"
    ckpt = root / "headless.safetensors"
    rc, stdout, err = run_cli(capsys, "features", str(imgs), "--checkpoint", str(ckpt), "--out", str(out), "-b", "2")
    assert rc == 0, err
    arr = np.load(out)
    assert arr.shape == (3, 128) and arr.dtype == np.float32
    listed = (tmp_path / "f.npy.txt").read_text().splitlines()
    assert listed == [str(imgs / r) for r in GOOD]
    np.testing.assert_allclose(arr, _reference_features(ckpt, listed, "avg_featmap", [-1]), atol=1e-5)
    assert "(3, 128)" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "f.npy.txt"]  # no temporary files left


def test_features_safetensors_featmap_two_blocks(files, capsys, tmp_path):
    from safetensors import safe_open

    root, imgs = files
    out = tmp_path / "f.safetensors"
    ckpt = root / "cls.safetensors"
    argv = ["features", str(imgs), "--checkpoint", str(ckpt), "--out", str(out), "--out-type", "featmap"]
    rc, _, err = run_cli(capsys, *argv, "--out-indices", "0", "-1")
    assert rc == 0, err
    with safe_open(str(out), framework="np") as f:
        arr, meta = f.get_tensor("features"), f.metadata()
    assert arr.shape == (3, 2, 128, 4, 4)  # N, blocks, D, 56/14, 56/14
    files_listed = json.loads(meta["files"])
    assert files_listed == [str(imgs / r) for r in GOOD]
    assert meta["out_type"] == "featmap" and json.loads(meta["out_indices"]) == [0, -1]
    np.testing.assert_allclose(arr, _reference_features(ckpt, files_listed, "featmap", [0, -1]), atol=1e-5)


def test_features_dtype_bf16(files, capsys, tmp_path):
    """--dtype as in predict: bf16 autocast on CPU, float32 features close to fp32's; fp16 needs CUDA."""
    from safetensors import safe_open

    root, imgs = files
    ckpt = root / "headless.safetensors"
    out = tmp_path / "f.safetensors"
    rc, _, err = run_cli(capsys, "features", str(imgs), "--checkpoint", str(ckpt), "-o", str(out), "--dtype", "bf16")
    assert rc == 0, err
    with safe_open(str(out), framework="np") as f:
        arr, meta = f.get_tensor("features"), f.metadata()
    assert arr.dtype == np.float32 and meta["dtype"] == "bf16"
    ref = _reference_features(ckpt, json.loads(meta["files"]), "avg_featmap", [-1])
    assert not np.array_equal(arr, ref)  # computed in bfloat16 ...
    np.testing.assert_allclose(arr, ref, atol=0.1, rtol=0.05)  # ... and close to the float32 features
    if not torch.cuda.is_available():
        argv = ["features", str(imgs), "--checkpoint", str(ckpt), "-o", str(tmp_path / "g.npy"), "--dtype", "fp16"]
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and "--dtype fp16 needs a CUDA device (--device cuda)" in err
        assert not (tmp_path / "g.npy").exists()


def test_features_bad_image_and_errors(files, capsys, tmp_path):
    root, imgs = files
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    ckpt = str(root / "cls.safetensors")
    out = tmp_path / "f.npy"
    rc, _, err = run_cli(capsys, "features", str(imgs / "coffee.jpg"), str(bad), "--checkpoint", ckpt, "-o", str(out))
    assert rc == 1 and str(bad) in err and "Traceback" not in err
    assert np.load(out).shape == (1, 128)
    rc, _, err = run_cli(capsys, "features", str(imgs), "--checkpoint", ckpt, "-o", str(tmp_path / "f.csv"))
    assert rc == 2 and "must end in .npy or .safetensors" in err
    rc, _, err = run_cli(
        capsys, "features", str(imgs), "--checkpoint", ckpt, "-o", str(out), "--out-indices", "7", "--force"
    )
    assert rc == 2 and "out of range for a 2-block model" in err


def test_predict_progress_bar_only_on_a_terminal(files, capsys, monkeypatch):
    """Over several batches a bar is drawn on a terminal; in logs (stderr not a TTY) it stays silent
    instead of being redrawn after every result line."""
    root, imgs = files
    argv = ["predict", str(imgs), "--checkpoint", str(root / "cls.safetensors"), "--json", "-b", "1", "--workers", "0"]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0 and len(out.splitlines()) == 3
    assert "img/s" not in err and "predict:" not in err

    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0 and len(out.splitlines()) == 3 and "predict:" in err
