"""Exact resume of a segmentation run: resumed from a mid-run checkpoint, the segmentor ends with the
weights of the uninterrupted run (BatchNorm statistics, the auxiliary head and the sliding-window
validation included)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_seg_learning import CONFIG, write_scenes

from eva02.cli import main


def test_resume_from_a_mid_run_checkpoint_matches(tmp_path: Path) -> None:
    data = write_scenes(tmp_path / "scenes", 24, 4, (96, 112), seed=2)
    sets = [f"data.root={data}", "model.img_size=96", "model.depth=2", "seg.window_size=3", "seg.global_blocks=(1,)",
            "seg.scale=(384,96)", "seg.stride=64", "data.batch_size=4", "optim.global_batch=4", "schedule.epochs=2",
            "schedule.warmup_epochs=0.5", "checkpoint.every_steps=4", "checkpoint.keep_last=10",
            "train.eval_every_epochs=1", "model.drop_path=0.1", "train.log_every=1"]  # fmt: skip
    full = tmp_path / "full"
    assert main(["train", str(CONFIG), "--work-dir", str(full), "--set", *sets]) == 0
    mid = full / "checkpoints" / "step_00000008.pt"  # mid second epoch (6 steps per epoch)
    assert mid.is_file(), sorted(p.name for p in (full / "checkpoints").iterdir())
    resumed = tmp_path / "resumed"
    assert main(["train", str(CONFIG), "--work-dir", str(resumed), "--resume", str(mid), "--set", *sets]) == 0
    steps = [json.loads(line).get("step") for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert min(s for s in steps if s is not None) == 9  # it went on from step 8, it did not start again
    a, b = load_file(full / "final.safetensors"), load_file(resumed / "final.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
