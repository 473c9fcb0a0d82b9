"""`eva02 detect`: inputs and outputs checked before the model loads, a table or JSON lines, drawings and
COCO-format results that pycocotools reads, unreadable images skipped with a warning (exit code 1)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from test_det_data import render_scenes  # noqa: E402
from test_det_engine import det_run  # noqa: E402

from eva02.cli import main  # noqa: E402
from eva02.engine.tasks.detect import build_detector  # noqa: E402
from eva02.weights.load import save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A random-weight detector file, its config.json and three rendered images (and their annotations)."""
    root = tmp_path_factory.mktemp("det_cli")
    render_scenes(root, 3, size=112, seed=7)
    cfg = det_run(root)
    torch.manual_seed(0)
    save_checkpoint(build_detector(cfg), root / "final.safetensors")
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    return root


def _args(root, *more) -> list[str]:
    return ["detect", str(root / "scenes"), "--config", str(root / "config.json"),
            "--checkpoint", str(root / "final.safetensors"), "--threads", "1", *more]  # fmt: skip


def test_json_lines_drawings_and_coco_results(detector, tmp_path, capsys) -> None:
    out = tmp_path / "drawn"
    assert main(_args(detector, "--json", "--score-thr", "0.2", "-o", str(out))) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["file"].rsplit("/", 1)[-1] for x in lines] == ["0000.png", "0001.png", "0002.png"]
    dets = [d for x in lines for d in x["detections"]]
    assert dets and {"label", "class", "score", "box"} <= set(dets[0]) and min(d["score"] for d in dets) >= 0.2
    assert {d["class"] for d in dets} <= {"square", "disc", "triangle"}  # names from the config's annotations
    assert sorted(p.name for p in out.iterdir()) == ["0000_det.png", "0001_det.png", "0002_det.png", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(dets) and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert len(COCO(str(detector / "scenes.json")).loadRes(str(out / "results.json")).anns) == len(dets)
    # outputs are never replaced without --force, and that is known before the model loads
    before = (out / "0000_det.png").read_bytes()
    assert main(_args(detector, "-o", str(out))) == 2
    assert "--force" in capsys.readouterr().err and (out / "0000_det.png").read_bytes() == before
    assert main(_args(detector, "-o", str(out), "--force", "--score-thr", "0.99")) == 0
    assert "detection" in capsys.readouterr().out


def test_inputs_are_checked_first(detector, tmp_path, capsys) -> None:
    assert main([*_args(detector), "--score-thr", "2"]) == 2
    assert "--score-thr must be in [0, 1]" in capsys.readouterr().err
    args = _args(detector)
    args[args.index("--checkpoint") + 1] = str(tmp_path / "none.safetensors")
    assert main(args) == 2 and "does not exist" in capsys.readouterr().err
    cls = json.loads((detector / "config.json").read_text())
    cls["train"]["task"] = "classify"
    (tmp_path / "cls.json").write_text(json.dumps(cls))
    args = _args(detector)
    args[args.index("--config") + 1] = str(tmp_path / "cls.json")
    assert main(args) == 2 and "not a detector's" in capsys.readouterr().err


def test_an_unreadable_image_is_skipped_with_a_warning(detector, tmp_path, capsys) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    args = _args(detector, "--score-thr", "0.99")
    args[1:2] = [str(detector / "scenes" / "0000.png"), str(bad)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "1 of 2 images failed" in captured.err
    assert "0000.png" in captured.out
