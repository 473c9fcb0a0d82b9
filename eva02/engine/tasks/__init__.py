"""What the training loop trains: the task table and the `Task` protocol every task follows.

The loop (`eva02.engine.train`) is one for all tasks; a task supplies, from the run config:

- `build_model(cfg, load_init=True)`: the single-device model (the loop shards, checkpoints and compiles it);
- `build_datasets(cfg)`: the checked train and optional validation datasets;
- `collate(items)`: the batch dict, with a 'bad' list of (path, reason) for images that failed to load;
  classify and mim batches may hold uint8 images (`data.device_normalize`) that the loop normalises after
  moving them (`engine.loader.device_normalizer(cfg, model)`, applied by `to_device`);
- `build_loss(cfg)`: a module called as `loss(model, batch)` -> scalar loss, holding what the loss needs
  besides the model (mixup, a frozen teacher); the loop moves it to the training device;
- `evaluate(cfg, model, loader, device, amp)`: validation metrics summed over processes ({} if none);
- `export_model(cfg, state_dict)`: the run's deliverable (final.safetensors) from the trained state;
- `best_metric`: the metric that picks `best.pt`, higher is better (None: no best checkpoint);
- `shown_metrics`: the metrics printed after an evaluation.

No method sets state on the task (the MIM task caches its teacher per settings, a cache only): each
is a function of its arguments, so the loop may call them in any order. `Task` in `tasks/base.py` holds the
exact signatures. Task modules import the config for type checking only, because the config checks
`train.task` against `TASKS`; a task's data code that needs torchvision is imported where it is used.

Adding a task is a module in this package and its line in `TASKS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eva02.engine.tasks.base import Task, build_eva02, model_config
from eva02.engine.tasks.classify import ClassificationTask, soft_cross_entropy
from eva02.engine.tasks.detect import DetectionTask
from eva02.engine.tasks.mim import MimTask
from eva02.engine.tasks.segment import SegmentTask
from eva02.engine.tasks.zero_shot import ZeroShotTask

if TYPE_CHECKING:
    from eva02.engine.config import RunConfig

__all__ = ["TASKS", "ClassificationTask", "MimTask", "Task", "ZeroShotTask", "build_eva02", "model_config",
           "soft_cross_entropy", "task_for"]  # fmt: skip

# `train.task` name -> task class.
TASKS: dict[str, type[Task]] = {
    "classify": ClassificationTask,  # fine-tuning a classifier (the default)
    "mim": MimTask,  # masked-image-modelling pre-training against a frozen teacher
    "zero_shot": ZeroShotTask,  # EVA-02-CLIP zero-shot classification (evaluation only)
    "detect": DetectionTask,  # object detection and instance segmentation: Mask R-CNN (COCO AP)
    "segment": SegmentTask,  # semantic segmentation: EVA-02 + UperNet (mIoU)
}


def task_for(cfg: RunConfig) -> Task:
    """A new task of the kind `train.task` names."""
    return TASKS[cfg.train.task]()
