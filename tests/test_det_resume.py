"""Exact resume of a detection run: resumed from a mid-run checkpoint, the detector ends with the weights
of the uninterrupted run (large-scale jitter, RPN and ROI sampling included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")
from safetensors.torch import load_file  # noqa: E402
from test_det_learning import scenes_run  # noqa: E402

from eva02.cli import main  # noqa: E402


def test_resume_from_a_mid_run_checkpoint_matches(tmp_path: Path) -> None:
    root = tmp_path / "scenes"  # the runs' final evaluations on the 8 training images: no held-out scenes
    changes = {"checkpoint.every_steps": 1, "checkpoint.keep_last": 10, "model.depth": 2, "det.global_blocks": (1,),
               "data.val_split": "train", "det.val_ann": str(root / "train.json")}  # fmt: skip
    config = scenes_run(root, 8, 2, n_val=0, **changes)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(["train", str(config), "--work-dir", str(full)]) == 0
    mid = full / "checkpoints" / "step_00000003.pt"  # mid second epoch (2 steps per epoch)
    assert mid.is_file(), sorted(p.name for p in (full / "checkpoints").iterdir())
    assert main(["train", str(config), "--work-dir", str(resumed), "--resume", str(mid)]) == 0
    steps = [json.loads(line).get("step") for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert min(s for s in steps if s is not None) == 4  # it went on from step 3, it did not start again
    a, b = load_file(full / "final.safetensors"), load_file(resumed / "final.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # bf16 is emulated on CPUs without AMX: about 30 s here
def test_bf16_autocast_trains_and_evaluates(tmp_path: Path) -> None:
    """AMP on the detector (bf16 autocast, here on the CPU): the steps and the COCO evaluation run."""
    config = scenes_run(tmp_path / "scenes", 8, 1, **{"model.depth": 2, "det.global_blocks": (1,),
                                                     "train.amp": "bf16", "train.eval_every_epochs": 1})  # fmt: skip
    assert main(["train", str(config), "--work-dir", str(tmp_path / "run")]) == 0
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("kind") == "train"]
    assert len(losses) == 2 and all(v == v for v in losses)
    assert any(r.get("kind") == "eval" and "bbox_AP50" in r for r in recs)
