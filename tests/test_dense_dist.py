"""Segmentation and detection runs under torchrun on CPU (gloo): 2 processes with DDP and with FSDP2 train
to the end and write their final weights. (Their losses cannot follow a 1-process run step for step as the
classifiers' do: UperNet's BatchNorm sees each process's half batch, and the detector samples anchors and
proposals per process.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_engine_dist import _finish, _launch

pytest.importorskip("pycocotools")


def _seg_config(tmp: Path) -> Path:
    from test_seg_learning import CONFIG, write_scenes

    from eva02.engine.config import load_config, override

    data = write_scenes(tmp / "scenes", 16, 4, (96, 112), seed=3)
    cfg = override(load_config(CONFIG), {
        "data.root": str(data), "model.img_size": 96, "model.depth": 2, "seg.window_size": 3,
        "seg.global_blocks": (1,), "seg.scale": (384, 96), "seg.stride": 64, "data.batch_size": 4,
        "optim.global_batch": 8, "schedule.epochs": 2, "train.eval_every_epochs": 2, "train.log_every": 1,
    })  # fmt: skip
    path = tmp / "seg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def _det_config(tmp: Path) -> Path:
    from test_det_learning import scenes_run

    return scenes_run(tmp / "det", 8, 2, **{"model.depth": 2, "det.global_blocks": (1,), "data.batch_size": 2,
                                            "optim.global_batch": 4})  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("task", ["seg", "det"])
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_a_dense_task(tmp_path: Path, task: str, parallel: str) -> None:
    cfg = _seg_config(tmp_path) if task == "seg" else _det_config(tmp_path)
    wd = tmp_path / f"{task}_{parallel}"
    _finish(_launch(cfg, wd, 2, "--set", f"train.parallel={parallel}"), wd)
    recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("kind") == "train"]
    assert losses and all(v == v for v in losses)  # trained, no NaN
    assert (wd / "final.safetensors").is_file()
