"""Typed run configuration: frozen dataclasses, config files, and checked `--cfg-options a.b=v` overrides.

A config file is Python that defines `config = RunConfig(...)`; it may load another file with
`load_config` and derive from it with `override`. Defaults are the official EVA-02 fine-tuning recipe
(`EVA-02/asuka/README.md`, `run_class_finetuning.py`): AdamW, wd 0.05, betas (0.9, 0.999), per-step
cosine to 0 after linear warmup, RandAugment m9/mstd0.5, no mixup/cutmix/erasing, EMA 0.9999.

Every value is checked, whether it comes from a Python config file, a saved config.json or `--set`:
each section brings its fields to their annotated types and checks them against `RULES` when it is
built (so also on every `override`), and `check_config` adds the checks that span fields. A failure is
a `ConfigError`: one line naming the source, the dotted field, the bad value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import os
import re
import runpy
import traceback
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from eva02 import fileio
from eva02.model.config import VARIANTS
from eva02.weights.zoo import CLIP_MEAN, CLIP_STD, resolve  # the one definition of the CLIP statistics


class ConfigError(ValueError):
    """A config value that does not fit: `problems` (one per field) and where they come from (`source`)."""

    def __init__(self, problems: list[str] | str, source: str = "", path: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source, self.path = source, path  # path: set once the error is attributed to a config file
        text = "; ".join(self.problems)
        super().__init__(f"{source}: {text}" if source else text)


class _Section:
    """Base of the config sections: fields are fitted to their types and checked when a section is built."""

    def __post_init__(self) -> None:
        problems = section_problems(self)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class ModelCfg(_Section):
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
class DataCfg(_Section):
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
class OptimCfg(_Section):
    """AdamW with layer-wise lr decay; no weight decay on 1-D parameters, pos_embed and cls_token."""

    lr: float = 2e-4
    layer_decay: float = 0.9
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0  # max grad norm; 0 disables clipping (official fine-tuning)
    global_batch: int = 1024  # target; accumulation = global_batch / (batch_size x world); 0 = no accumulation


@dataclass(frozen=True)
class ScheduleCfg(_Section):
    """Per-step cosine from lr to min_lr after a linear warmup from warmup_lr."""

    epochs: int = 100
    warmup_epochs: float = 5.0
    min_lr: float = 0.0
    warmup_lr: float = 0.0


@dataclass(frozen=True)
class EmaCfg(_Section):
    enabled: bool = False
    decay: float = 0.9999
    evaluate: bool = True  # evaluate the EMA weights alongside the live ones


@dataclass(frozen=True)
class CheckpointCfg(_Section):
    every_epochs: int = 1  # save at the end of every N epochs (0: only the last epoch)
    every_steps: int = 0  # also save every N optimizer steps, mid-epoch (0: off)
    keep_last: int = 2  # periodic checkpoints kept (older ones pruned); 'last' and 'best' are always kept


@dataclass(frozen=True)
class TrainCfg(_Section):
    """How the loop runs: precision, parallelism, memory, logging, reproducibility."""

    amp: str = "none"  # 'none' | 'bf16' | 'fp16' (fp16 uses dynamic loss scaling)
    parallel: str = "ddp"  # 'ddp' | 'fsdp' (FSDP2 fully_shard per block; for the large models)
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    eval_every_epochs: int = 1  # 0: evaluate after the last epoch only
    log_every: int = 10  # optimizer steps between metric lines
    max_steps: int = 0  # stop after this many optimizer steps (0: all epochs); for smoke runs
    threads: int = 0  # CPU threads per process for torch ops (0: the cores free at start, see eva02/threads.py)
    task: str = "classify"  # 'classify' (fine-tuning) or 'mim' (masked-image-modelling pre-training)
    dist_timeout_s: float = 600.0  # torch.distributed collective timeout (seconds) before a stuck rank fails


TEACHER_KINDS = ("open_clip", "eva02")


@dataclass(frozen=True)
class MimCfg(_Section):
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
        check_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "saved config") -> RunConfig:
        """Rebuild from `to_dict` output (as saved in a work dir or checkpoint), checking every key."""
        if not isinstance(d, dict):
            raise ConfigError(f"expects a mapping of config sections, got {type(d).__name__}", source)
        bad = [
            f"section {s!r} expects a mapping, got {type(v).__name__}" for s, v in d.items() if not isinstance(v, dict)
        ]
        if bad:
            raise ConfigError(bad, source)
        return override(cls(), {f"{sec}.{k}": v for sec, sub in d.items() for k, v in sub.items()}, source)


# ------------------------------------------------------------------------------------ checks
# A rule is (check, text); '{type}' in the text becomes the field's type. Free-form strings (paths,
# splits, tags) and booleans have no rule: their type is their whole contract.
Rule = tuple[Callable[[Any], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "{type} > 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, "{type} >= 0")
PROBABILITY: Rule = (lambda v: 0 <= v <= 1, "{type} in [0, 1]")
FRACTION: Rule = (lambda v: 0 <= v < 1, "{type} in [0, 1)")  # a 1 would leave nothing (decay, drop, smoothing)


def _one_of(*options: str) -> Rule:
    return (lambda v: v in options, "one of " + ", ".join(map(repr, options)))


def _known_model(name: str) -> bool:
    try:
        return name in VARIANTS or bool(resolve(name))
    except ValueError:
        return False


RULES: dict[str, Rule] = {
    "model.name": (_known_model, f"a variant ({', '.join(VARIANTS)}) or a zoo name (see `eva02 list`)"),
    "model.num_classes": NON_NEGATIVE,  # 0: headless
    "model.img_size": POSITIVE,
    **dict.fromkeys(("model.patch_size", "model.depth", "model.dim", "model.heads", "model.mlp_hidden"), NON_NEGATIVE),
    "model.drop_path": FRACTION,
    "model.patch_grad_scale": PROBABILITY,
    "data.batch_size": POSITIVE,
    "data.eval_batch_size": NON_NEGATIVE,
    "data.workers": NON_NEGATIVE,
    "data.mean": (lambda v: len(v) == 3, "three numbers (R, G, B)"),
    "data.std": (lambda v: len(v) == 3 and min(v) > 0, "three numbers > 0 (R, G, B)"),
    "data.crop_pct": (lambda v: 0 < v <= 1, "{type} in (0, 1]"),
    "data.interpolation": _one_of("bicubic", "bilinear", "nearest"),
    "data.rrc_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two numbers 0 < min <= max <= 1"),
    "data.rrc_ratio": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "two numbers 0 < min <= max"),
    "data.hflip": PROBABILITY,
    "data.randaug_n": NON_NEGATIVE,
    "data.randaug_m": (lambda v: 0 <= v <= 10, "{type} in [0, 10]"),  # RandAugment's magnitude scale
    "data.randaug_mstd": NON_NEGATIVE,
    "data.reprob": PROBABILITY,
    "data.mixup": NON_NEGATIVE,  # Beta(alpha, alpha) parameters
    "data.cutmix": NON_NEGATIVE,
    "data.mix_prob": PROBABILITY,
    "data.mix_switch_prob": PROBABILITY,
    "data.smoothing": FRACTION,
    "data.max_bad_fraction": FRACTION,
    "optim.lr": POSITIVE,
    "optim.layer_decay": (lambda v: 0 < v <= 1, "{type} in (0, 1]"),
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optim.eps": POSITIVE,
    "optim.clip_grad": NON_NEGATIVE,
    "optim.global_batch": NON_NEGATIVE,
    "schedule.epochs": POSITIVE,
    "schedule.warmup_epochs": NON_NEGATIVE,
    "schedule.min_lr": NON_NEGATIVE,
    "schedule.warmup_lr": NON_NEGATIVE,
    "ema.decay": FRACTION,
    "checkpoint.every_epochs": NON_NEGATIVE,
    "checkpoint.every_steps": NON_NEGATIVE,
    "checkpoint.keep_last": (lambda v: v >= 1, "{type} >= 1"),  # the newest periodic file is always kept
    "train.amp": _one_of("none", "bf16", "fp16"),
    "train.parallel": _one_of("ddp", "fsdp"),
    "train.seed": NON_NEGATIVE,
    "train.eval_every_epochs": NON_NEGATIVE,
    "train.log_every": POSITIVE,
    "train.max_steps": NON_NEGATIVE,
    "train.threads": NON_NEGATIVE,
    "train.task": _one_of("classify", "mim"),
    "train.dist_timeout_s": POSITIVE,
    "mim.teacher_kind": _one_of(*TEACHER_KINDS),
    "mim.teacher_name": (bool, "a non-empty name"),
    "mim.teacher_amp": _one_of("bf16", "fp16", "none"),
    "mim.target_dim": NON_NEGATIVE,
    "mim.num_masking": (lambda v: 1 <= v <= 256, "{type} in [1, 256] (patches of the 16x16 grid)"),
    "mim.min_num": POSITIVE,
    "mim.max_num": NON_NEGATIVE,
    "mim.min_aspect": (lambda v: 0 < v <= 1, "{type} in (0, 1]"),
}

# Checks that span fields: (key, check of the whole config, what is allowed; '{cfg}' is the config).
CROSS_RULES: list[tuple[str, Callable[[RunConfig], bool], str]] = [
    ("schedule.min_lr", lambda c: c.schedule.min_lr <= c.optim.lr,
     "a value <= optim.lr={cfg.optim.lr} (the cosine ends there)"),
    ("schedule.warmup_lr", lambda c: c.schedule.warmup_lr <= c.optim.lr,
     "a value <= optim.lr={cfg.optim.lr} (warmup rises to it)"),
    ("model.init", lambda c: not (c.model.init == "pretrained" and c.model.name in VARIANTS),
     "a checkpoint path or '': 'pretrained' needs a zoo name in model.name, not the variant {cfg.model.name!r}"),
    ("mim.min_num", lambda c: c.mim.min_num <= c.mim.num_masking, "a value <= mim.num_masking={cfg.mim.num_masking}"),
    ("mim.max_num", lambda c: c.mim.max_num == 0 or c.mim.max_num >= c.mim.min_num,
     "0 or a value >= mim.min_num={cfg.mim.min_num}"),
]  # fmt: skip


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _section_name(cls: type) -> str:
    names = {tp: name for name, tp in _hints(RunConfig).items()}
    return next(names[c] for c in cls.__mro__ if c in names)


def section_problems(sub: Any) -> list[str]:
    """Fit each field of a section to its annotated type (5 -> 5.0, [a, b] -> (a, b)) and check its rule."""
    section = _section_name(type(sub))
    problems = []
    for name, tp in _hints(type(sub)).items():
        key = f"{section}.{name}"
        try:
            value = coerce(getattr(sub, name), tp, key, text=False)
        except ConfigError as e:
            problems += e.problems
            continue
        object.__setattr__(sub, name, value)  # frozen: the fitted value replaces the given one
        check, text = RULES.get(key, (None, ""))
        if check is not None and not check(value):
            problems.append(f"{key}={value!r}: expects {text.format(type=_type_name(tp))}")
    return problems


def check_config(cfg: RunConfig) -> None:
    """The validation of a whole run config: section types, every field's rule, the cross-field rules."""
    problems = []
    for name, tp in _hints(RunConfig).items():
        sub = getattr(cfg, name)
        if not isinstance(sub, tp):
            problems.append(f"{name}={sub!r}: expects {tp.__name__}(...)")
        else:
            problems += section_problems(sub)
    if not problems:
        problems = [
            f"{k}={get_value(cfg, k)!r}: expects {t.format(cfg=cfg)}" for k, check, t in CROSS_RULES if not check(cfg)
        ]
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------ key access
def valid_keys(cfg: RunConfig | None = None) -> list[str]:
    """Every settable dotted key, e.g. 'optim.lr'."""
    cfg = cfg or RunConfig()
    return [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]


def get_value(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _unknown_key(section: str, name: str) -> ConfigError:
    sections = _hints(RunConfig)
    if section not in sections:
        return ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(sections)}")
    valid = ", ".join(_hints(sections[section]))
    return ConfigError(f"unknown config key '{section}.{name}'; valid keys in {section}: {valid}")


def _lookup(cfg: RunConfig, key: str) -> tuple[str, str, Any]:
    """Split 'a.b' and return (section, field, annotated type), or raise listing the valid keys."""
    section, _, name = key.partition(".")
    sections = _hints(RunConfig)
    if section not in sections or name not in _hints(sections[section]):
        raise _unknown_key(section, name)
    return section, name, _hints(sections[section])[name]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if not typing.get_args(tp) else str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str, text: bool = True) -> Any:
    """Convert a value to the annotated type; raise a ConfigError naming the key if it does not fit.

    With `text` (command-line and JSON values) strings are parsed ('1e-4', 'true', '(0.9, 0.98)');
    without it (Python config files) a string is only a string.
    """

    def bad() -> ConfigError:  # names the value as parsed so far
        return ConfigError(f"{key}={value!r}: expects {_type_name(tp)}")

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if type(None) in arms and (value is None or (text and str(value).strip().lower() in ("none", "null"))):
            return None
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return coerce(value, arm, key, text)
            except ConfigError:
                pass
        raise bad()
    if text and isinstance(value, str) and tp is not str:
        value = value.strip()
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if tp is not bool or value.lower() not in ("true", "false", "yes", "no", "on", "off"):
                raise bad() from None
            value = value.lower() in ("true", "yes", "on")
    if tp is bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise bad()
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        if tp is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise bad()
            return value
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}: expects a finite float")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if typing.get_origin(tp) is tuple:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, list | tuple):
            raise bad()
        try:
            return tuple(coerce(v, typing.get_args(tp)[0], key, text) for v in value)
        except ConfigError:
            raise bad() from None
    raise bad()


def override(cfg: RunConfig, changes: dict[str, Any], source: str = "--set") -> RunConfig:
    """A copy of `cfg` with dotted keys changed; values may be text ('1e-4', 'true', '0.9,0.998').

    The result is checked as a whole; errors name `source` (the CLI's option, a file) and every bad key.
    """
    per_section: dict[str, dict[str, Any]] = {}
    problems = []
    for key, value in changes.items():
        try:
            section, name, tp = _lookup(cfg, key)
            if isinstance(value, str) and typing.get_origin(tp) is tuple and "," in value and "(" not in value:
                value = "(" + value + ")"
            per_section.setdefault(section, {})[name] = coerce(value, tp, key)
        except ConfigError as e:
            problems += e.problems
    subs = {}
    for section, kv in per_section.items():
        try:
            subs[section] = dataclasses.replace(getattr(cfg, section), **kv)
        except ConfigError as e:
            problems += e.problems
    try:
        if problems:
            raise ConfigError(problems)
        return dataclasses.replace(cfg, **subs)
    except ConfigError as e:
        raise ConfigError(e.problems, source) from None


def parse_options(options: list[str] | None) -> dict[str, str]:
    """['a.b=v', ...] -> {'a.b': 'v'}; a malformed item is an error naming it."""
    out = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config option {item!r} is not KEY=VALUE (e.g. optim.lr=1e-4)", "--set")
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
_UNEXPECTED = re.compile(r"^(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


def _file_error(p: Path, e: Exception) -> ConfigError:
    """Any error raised while running config file `p`, as one ConfigError naming the file and its line."""
    if isinstance(e, ConfigError) and e.path is not None:
        return e  # already names the (nested) config file it comes from
    here = os.path.abspath(p)
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == here]
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == here:
        lines.append(e.lineno)
    source = f"config file {str(p)!r}" + (f", line {lines[-1]}" if lines and lines[-1] else "")
    if isinstance(e, ConfigError):
        return ConfigError(e.problems, source, str(p))
    m = _UNEXPECTED.match(str(e)) if isinstance(e, TypeError) else None
    sections = {tp.__name__: name for name, tp in _hints(RunConfig).items()}
    if m and m[1] in sections:  # a typo'd field in a section's constructor, e.g. OptimCfg(lrr=1)
        return ConfigError(_unknown_key(sections[m[1]], m[2]).problems, source, str(p))
    if m and m[1] == "RunConfig":
        return ConfigError(_unknown_key(m[2], "").problems, source, str(p))
    return ConfigError(f"{type(e).__name__}: {e.msg if isinstance(e, SyntaxError) else e}", source, str(p))


def load_run(path: str | os.PathLike) -> tuple[RunConfig, Any]:
    """A config file's `config` and, if it defines one, its `task` (e.g. MIM pre-training), else None.

    Python files are run (configs are code, as in mmpretrain); `.json` files (a saved resolved config)
    are only parsed. Any error in the file is a ConfigError naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist; see configs/eva02/ for examples")
    source = f"config file {str(p)!r}"
    if p.suffix == ".json":
        try:
            d = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"not valid JSON ({e})", source, str(p)) from None
        try:
            cfg = RunConfig.from_dict(d, source)
        except ConfigError as e:
            raise ConfigError(e.problems, source, str(p)) from None
        return cfg, task_for(cfg)
    try:
        ns = runpy.run_path(str(p))
    except Exception as e:
        error = _file_error(p, e)
        if error is e:
            raise
        raise error from e
    cfg = ns.get("config")
    if not isinstance(cfg, RunConfig):
        raise ConfigError("must define `config = RunConfig(...)`", source, str(p))
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


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`eva02.fileio.atomic_write_text` (umask permissions, no half-written file), creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return fileio.atomic_write_text(path, text)
