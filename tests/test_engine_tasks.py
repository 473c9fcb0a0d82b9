"""The task contract: every task of the table follows the `Task` protocol, building sets no state on a task
(its methods work in any order), `train.task` picks the task, and the loop's predicates put evaluations
and checkpoints on the steps the config names."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_engine_digits import config_text, write_digits

from eva02.engine.config import RunConfig, load_config, override
from eva02.engine.loader import device_normalizer, to_device
from eva02.engine.tasks import TASKS, ClassificationTask, MimTask, Task, task_for
from eva02.engine.train import Trainer

PROTOCOL = ("build_model", "build_datasets", "collate", "build_loss", "evaluate", "export_model")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_follows_the_protocol(name: str) -> None:
    task = TASKS[name]()
    assert task.best_metric is None or isinstance(task.best_metric, str)
    assert isinstance(task.shown_metrics, tuple)
    for method in PROTOCOL:
        expected = list(inspect.signature(getattr(Task, method)).parameters)
        assert list(inspect.signature(getattr(type(task), method)).parameters) == expected, (name, method)


def test_train_task_picks_the_task() -> None:
    assert type(task_for(RunConfig())) is ClassificationTask
    assert type(task_for(override(RunConfig(), {"train.task": "mim"}))) is MimTask
    with pytest.raises(ValueError, match="train.task='caption': expects one of 'classify', 'mim'"):
        override(RunConfig(), {"train.task": "caption"})


def test_classification_builds_set_no_state(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "d", limit=40)
    (tmp_path / "c.py").write_text(config_text(root, batch=4))
    cfg = load_config(tmp_path / "c.py")
    task = ClassificationTask()
    loss = task.build_loss(cfg)  # before the datasets: the order does not matter
    train, val = task.build_datasets(cfg)
    model = task.build_model(cfg)
    assert vars(task) == {}
    batch = task.collate([train[(0, i)] for i in range(4)])
    assert batch["images"].dtype == torch.uint8  # data.device_normalize: the loop's step normalises them
    value = loss(model, to_device(batch, torch.device("cpu"), device_normalizer(cfg, model)))
    assert value.ndim == 0 and torch.isfinite(value)
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=task.collate)
    metrics = ClassificationTask().evaluate(cfg, model, loader, torch.device("cpu"), None)  # a fresh task
    assert metrics["count"] == len(val) == 8 and 0 <= metrics["top1"] <= 100
    exported = task.export_model(cfg, model.state_dict())
    assert exported is not model and torch.equal(exported.head.weight, model.head.weight)


def _steps(due, steps_per_epoch: int, epochs: int, total: int, *every: int) -> list[int]:
    """The global steps on which `due(...)` holds, driving the loop's counters as `fit` does."""
    cfg = SimpleNamespace(schedule=SimpleNamespace(epochs=epochs))
    t = SimpleNamespace(cfg=cfg, total_steps=total, epoch=0, step_in_epoch=0, global_step=0)
    out = []
    while t.global_step < total:
        t.global_step += 1
        t.step_in_epoch += 1
        end = t.step_in_epoch == steps_per_epoch
        if end:
            t.epoch, t.step_in_epoch = t.epoch + 1, 0
        if due(t, end, *every):
            out.append(t.global_step)
    return out


def test_evaluations_and_checkpoints_fall_where_the_config_says() -> None:
    due = Trainer._due
    # 5 steps per epoch, 3 epochs: every 2nd epoch end, every 4 steps, and the last step.
    assert _steps(due, 5, 3, 15, 2, 4) == [4, 8, 10, 12, 15]
    assert _steps(due, 5, 3, 15, 1) == [5, 10, 15]
    assert _steps(due, 5, 3, 15, 0) == [15]  # 0: only at the end
    assert _steps(due, 5, 3, 7, 1, 3) == [3, 5, 6, 7]  # train.max_steps=7 ends the run mid-epoch
