"""Typed run configuration: frozen dataclasses, config files, and checked `--cfg-options a.b=v` overrides.

A config file is Python that defines `config = RunConfig(...)`; it may load another file with
`load_config` and derive from it with `override`. Defaults are the official EVA-02 fine-tuning recipe
(`EVA-02/asuka/README.md`, `run_class_finetuning.py`): AdamW, wd 0.05, betas (0.9, 0.999), per-step
cosine to 0 after linear warmup, RandAugment m9/mstd0.5, no mixup/cutmix/erasing, EMA 0.9999.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import runpy
import tempfile
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from eva02.weights.zoo import CLIP_MEAN, CLIP_STD  # the one definition of the CLIP statistics


@dataclass(frozen=True)
class ModelCfg:
    """Which network to build and where its initial weights come from."""

    name: str = "tiny"  # a zoo name of the reference page, or a variant of eva02.model.VARIANTS
    init: str = ""  # '' random init; 'pretrained': the zoo weights of `name`; otherwise a checkpoint path
    use_ema: bool | None = None  # which weights of an init checkpoint holding both (None: the loader's default)
    num_classes: int = 1000
    img_size: int = 224
    # Architecture overrides of the variant; 0 keeps the variant's own value (tests use tiny models).
    patch_size: int = 0
    depth: int = 0
    dim: int = 0
    heads: int = 0
    mlp_hidden: int = 0
    drop_path: float = 0.1
    # 0 detaches the patch embedding output (official fine-tuning `stop_grad_conv1`), 1 trains it normally.
    patch_grad_scale: float = 0.0


@dataclass(frozen=True)
class DataCfg:
    """Datasets (class folders or list files) and the train/eval transforms."""

    root: str = "data/imagenet"  # mmpretrain's layout: {root}/{split}/ images, {root}/meta/{split}.txt lists
    train_split: str = "train"
    val_split: str = "val"  # '' for no validation
    train_list: str = ""  # 'relative/path label' lines; '' uses {root}/meta/{split}.txt if present, else folders
    val_list: str = ""
    class_names: str = ""  # file with one class name a line ('' = folder names, or 'class_<i>' for lists)
    batch_size: int = 16  # per device; global batch = batch_size x devices x accumulation
    eval_batch_size: int = 0  # 0: same as batch_size
    workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    rrc_scale: tuple[float, ...] = (0.08, 1.0)  # RandomResizedCrop scale; (1.0, 1.0) with ratio 1 = plain resize
    rrc_ratio: tuple[float, ...] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaug_n: int = 2  # RandAugment ops per image; 0 disables it
    randaug_m: int = 9
    randaug_mstd: float = 0.5
    reprob: float = 0.0  # random erasing probability
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    smoothing: float = 0.1
    max_bad_fraction: float = 0.001  # unreadable images tolerated (skipped with a warning) before the run stops


@dataclass(frozen=True)
class OptimCfg:
    """AdamW with layer-wise lr decay; no weight decay on 1-D parameters, pos_embed and cls_token."""

    lr: float = 2e-4
    layer_decay: float = 0.9
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0  # max grad norm; 0 disables clipping (official fine-tuning)
    global_batch: int = 1024  # target; accumulation = global_batch / (batch_size x world); 0 = no accumulation


@dataclass(frozen=True)
class ScheduleCfg:
    """Per-step cosine from lr to min_lr after a linear warmup from warmup_lr."""

    epochs: int = 100
    warmup_epochs: float = 5.0
    min_lr: float = 0.0
    warmup_lr: float = 0.0


@dataclass(frozen=True)
class EmaCfg:
    enabled: bool = False
    decay: float = 0.9999
    evaluate: bool = True  # evaluate the EMA weights alongside the live ones


@dataclass(frozen=True)
class CheckpointCfg:
    every_epochs: int = 1  # save at the end of every N epochs (0: only the last epoch)
    every_steps: int = 0  # also save every N optimizer steps, mid-epoch (0: off)
    keep_last: int = 2  # periodic checkpoints kept (older ones pruned); 'last' and 'best' are always kept


@dataclass(frozen=True)
class TrainCfg:
    """How the loop runs: precision, parallelism, memory, logging, reproducibility."""

    amp: str = "none"  # 'none' | 'bf16' | 'fp16' (fp16 uses dynamic loss scaling)
    parallel: str = "ddp"  # 'ddp' | 'fsdp' (FSDP2 fully_shard per block; for the large models)
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    eval_every_epochs: int = 1
    log_every: int = 10  # optimizer steps between metric lines
    max_steps: int = 0  # stop after this many optimizer steps (0: all epochs); for smoke runs
    threads: int = 0  # CPU threads per process for torch ops (0: torch's default); 1 avoids oversubscription
    task: str = "classify"  # 'classify' (fine-tuning) or 'mim' (masked-image-modelling pre-training)


TEACHER_KINDS = ("open_clip", "eva02")


@dataclass(frozen=True)
class MimCfg:
    """Teacher and masking of a pre-training run (official recipe: EVA01-CLIP-g/14, 105 of 256 patches)."""

    teacher_kind: str = "open_clip"  # 'open_clip' (EVA-CLIP towers) or 'eva02' (our models / checkpoints)
    teacher_name: str = "EVA01-g-14"  # open_clip model name, or an eva02 zoo name / variant
    # open_clip: a pretrained tag or a local file; eva02: '' random, 'pretrained' zoo weights, or a file
    teacher_pretrained: str = "laion400m_s11b_b41k"
    teacher_amp: str = "bf16"  # teacher autocast dtype on CUDA: 'bf16', 'fp16' or 'none'
    target_dim: int = 0  # 0: the teacher's feature width (1024 for EVA01-CLIP-g)
    num_masking: int = 105  # patches masked per image (for the 16x16 grid; scaled for other grids)
    min_num: int = 16
    max_num: int = 0  # 0: no cap beyond num_masking
    min_aspect: float = 0.3

    def __post_init__(self) -> None:
        if self.teacher_kind not in TEACHER_KINDS:
            raise ValueError(f"mim.teacher_kind must be one of {TEACHER_KINDS}, got {self.teacher_kind!r}")
        if self.teacher_amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"mim.teacher_amp must be bf16, fp16 or none, got {self.teacher_amp!r}")
        if self.num_masking <= 0 or self.min_num <= 0 or self.target_dim < 0 or self.max_num < 0:
            raise ValueError("mim.num_masking and mim.min_num must be positive, target_dim and max_num >= 0")


@dataclass(frozen=True)
class RunConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    mim: MimCfg = field(default_factory=MimCfg)  # used when train.task == 'mim'

    def __post_init__(self) -> None:
        problems = []
        if self.train.amp not in ("none", "bf16", "fp16"):
            problems.append(f"train.amp must be none, bf16 or fp16, got {self.train.amp!r}")
        if self.train.task not in ("classify", "mim"):
            problems.append(f"train.task must be classify or mim, got {self.train.task!r}")
        if self.train.parallel not in ("ddp", "fsdp"):
            problems.append(f"train.parallel must be ddp or fsdp, got {self.train.parallel!r}")
        for key in ("data.batch_size", "schedule.epochs", "train.log_every"):
            if get_value(self, key) <= 0:
                problems.append(f"{key} must be positive, got {get_value(self, key)}")
        if not 0.0 < self.optim.layer_decay <= 1.0:
            problems.append(f"optim.layer_decay must be in (0, 1], got {self.optim.layer_decay}")
        if self.optim.lr <= 0:
            problems.append(f"optim.lr must be positive, got {self.optim.lr}")
        if len(self.optim.betas) != 2 or len(self.data.rrc_scale) != 2 or len(self.data.rrc_ratio) != 2:
            problems.append("optim.betas, data.rrc_scale and data.rrc_ratio need exactly two numbers")
        if len(self.data.mean) != len(self.data.std):
            problems.append("data.mean and data.std need the same length")
        if not 0.0 <= self.data.max_bad_fraction < 1.0:
            problems.append(f"data.max_bad_fraction must be in [0, 1), got {self.data.max_bad_fraction}")
        if problems:
            raise ValueError("invalid config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild from `to_dict` output (as saved in a work dir or checkpoint), checking every key."""
        return override(cls(), {f"{sec}.{k}": v for sec, sub in d.items() for k, v in _section_items(sec, sub)})


def _section_items(section: str, sub: Any) -> list[tuple[str, Any]]:
    if not isinstance(sub, dict):
        raise ValueError(f"config section {section!r} must be a mapping, got {type(sub).__name__}")
    return list(sub.items())


# ------------------------------------------------------------------------------------ key access
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cfg: RunConfig | None = None) -> list[str]:
    """Every settable dotted key, e.g. 'optim.lr'."""
    cfg = cfg or RunConfig()
    return [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]


def get_value(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _lookup(cfg: RunConfig, key: str) -> tuple[str, str, Any]:
    """Split 'a.b' and return (section, field, annotated type), or raise listing the valid keys."""
    sections = {f.name: f for f in fields(cfg)}
    section, _, name = key.partition(".")
    if section not in sections:
        raise ValueError(f"unknown config section {section!r} in {key!r}; valid sections: {', '.join(sections)}")
    sub = getattr(cfg, section)
    hints = _hints(type(sub))
    if name not in hints:
        raise ValueError(
            f"unknown config key {key!r}; valid keys in {section}: {', '.join(f.name for f in fields(sub))}"
        )
    return section, name, hints[name]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a parsed or textual value to the annotated type; raise a clear error if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
                    return None
                continue
            try:
                return coerce(value, arm, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if tp is bool and text.lower() in ("true", "false", "yes", "no", "on", "off"):
                value = text.lower() in ("true", "yes", "on")
            else:
                raise ValueError(f"config key {key!r} expects {_type_name(tp)}, got {text!r}") from None
    bad = ValueError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise bad
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, list | tuple):
            raise bad
        return tuple(coerce(v, typing.get_args(tp)[0], key) for v in value)
    raise bad


def override(cfg: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted keys changed; values may be text ('1e-4', 'true', '0.9,0.999')."""
    per_section: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        section, name, tp = _lookup(cfg, key)
        if isinstance(value, str) and typing.get_origin(tp) is tuple and "," in value and "(" not in value:
            value = "(" + value + ")"
        per_section.setdefault(section, {})[name] = coerce(value, tp, key)
    subs = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in per_section.items()}
    return dataclasses.replace(cfg, **subs)


def parse_options(options: list[str] | None) -> dict[str, str]:
    """['a.b=v', ...] -> {'a.b': 'v'}; a malformed item is an error naming it."""
    out = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config option {item!r} is not KEY=VALUE (e.g. optim.lr=1e-4)")
        out[key.strip()] = value
    return out


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v


def changed_keys(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Dotted keys whose value in `cfg` differs from a saved `to_dict()` (keys absent there are skipped)."""
    out = []
    for sec, sub in cfg.to_dict().items():
        for k, v in sub.items():
            old = saved.get(sec, {}).get(k, v)
            if _plain(old) != _plain(v):
                out.append(f"{sec}.{k}")
    return out


# ------------------------------------------------------------------------------- files
def load_run(path: str | os.PathLike) -> tuple[RunConfig, Any]:
    """A config file's `config` and, if it defines one, its `task` (e.g. MIM pre-training), else None.

    Python files are run (configs are code, as in mmpretrain); `.json` files (a saved resolved config)
    are only parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist; see configs/eva02/ for examples")
    if p.suffix == ".json":
        cfg = RunConfig.from_dict(json.loads(p.read_text()))
        return cfg, task_for(cfg)
    ns = runpy.run_path(str(p))
    cfg = ns.get("config")
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"config file {str(p)!r} must define `config = RunConfig(...)`")
    return cfg, ns.get("task") or task_for(cfg)


def task_for(cfg: RunConfig) -> Any:
    """The task `train.task` names: a MimTask for 'mim', None (classification, the loop's default) otherwise."""
    if cfg.train.task == "mim":
        from eva02.engine.tasks_mim import MimTask  # imported here: it pulls in the teacher code

        return MimTask()
    return None


def load_config(path: str | os.PathLike) -> RunConfig:
    """The `config` (a RunConfig) of a Python config file or a saved config.json."""
    return load_run(path)[0]


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON (loadable by `load_config`), atomically."""
    atomic_write_text(Path(path), json.dumps(cfg.to_dict(), indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
