"""Checking run configs: the rule of every field (`RULES`) and of field pairs (`CROSS_RULES`), fitting
values to their annotated types (`coerce`), and checked changes by dotted key (`override`, `--set`).

`eva02.engine.config` defines the sections and re-exports these names. A failure is a `ConfigError`: one
line naming the source, the dotted field, the bad value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from eva02 import dtypes
from eva02.engine.loader import UINT8_TASKS
from eva02.engine.tasks import TASKS
from eva02.model.config import VARIANTS
from eva02.weights.zoo import find_clip, resolve

if TYPE_CHECKING:
    from eva02.engine.config import RunConfig

TEACHER_KINDS = ("open_clip", "eva02_clip", "eva02")


class ConfigError(ValueError):
    """A config value that does not fit: `problems` (one per field) and where they come from (`source`)."""

    def __init__(self, problems: list[str] | str, source: str = "", path: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source, self.path = source, path  # path: set once the error is attributed to a config file
        text = "; ".join(self.problems)
        super().__init__(f"{source}: {text}" if source else text)


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
        return name in VARIANTS or find_clip(name) is not None or bool(resolve(name))
    except ValueError:
        return False


def _templates(v: str) -> bool:
    return v == "imagenet" or "{}" in v or v.endswith(".txt")


RULES: dict[str, Rule] = {
    "model.name": (_known_model, f"a variant ({', '.join(VARIANTS)}) or a zoo name (see `eva02 list`)"),
    "clip.templates": (_templates, "'imagenet', one template with {{}} for the class name, or a .txt file of them"),
    "model.num_classes": NON_NEGATIVE,  # 0: headless
    "model.img_size": POSITIVE,
    **dict.fromkeys(("model.patch_size", "model.depth", "model.dim", "model.heads", "model.mlp_hidden"), NON_NEGATIVE),
    "model.drop_path": FRACTION,
    "model.patch_grad_scale": PROBABILITY,
    "data.format": _one_of("folder", "list", "wds", "hf"),
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
    "data.shuffle_buffer": NON_NEGATIVE,
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
    "schedule.kind": _one_of("cosine", "poly"),
    "schedule.power": POSITIVE,
    "ema.decay": FRACTION,
    "checkpoint.every_epochs": NON_NEGATIVE,
    "checkpoint.every_steps": NON_NEGATIVE,
    "checkpoint.keep_last": (lambda v: v >= 1, "{type} >= 1"),  # the newest periodic file is always kept
    "train.amp": _one_of(*dtypes.DTYPES),
    "train.parallel": _one_of("ddp", "fsdp"),
    "train.seed": NON_NEGATIVE,
    "train.eval_every_epochs": NON_NEGATIVE,
    "train.log_every": POSITIVE,
    "train.max_steps": NON_NEGATIVE,
    "train.threads": NON_NEGATIVE,
    "train.task": _one_of(*TASKS),  # eva02.engine.tasks
    "train.dist_timeout_s": POSITIVE,
    "mim.teacher_kind": _one_of(*TEACHER_KINDS),
    "mim.teacher_name": (bool, "a non-empty name"),
    "mim.teacher_amp": _one_of(*dtypes.DTYPES, *dtypes.ALIASES),
    "mim.target_dim": NON_NEGATIVE,
    "mim.num_masking": (lambda v: 1 <= v <= 256, "{type} in [1, 256] (patches of the 16x16 grid)"),
    "mim.min_num": POSITIVE,
    "mim.max_num": NON_NEGATIVE,
    "mim.min_aspect": (lambda v: 0 < v <= 1, "{type} in (0, 1]"),
    "det.window_size": NON_NEGATIVE,
    "det.global_blocks": (lambda v: min(v, default=0) >= 0, "block indexes >= 0"),
    "det.lsj_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "two numbers 0 < min <= max"),
    "det.anchor_sizes": (lambda v: len(v) == 5 and min(v) > 0, "five sizes > 0 (pyramid levels p2-p6)"),
    "det.aspect_ratios": (lambda v: len(v) > 0 and min(v) > 0, "one or more numbers > 0"),
    "det.out_channels": POSITIVE,
    "det.roi_batch_per_image": POSITIVE,
    "det.rpn_pre_nms_top_n": (lambda v: len(v) == 2 and min(v) > 0, "two numbers > 0 (training, testing)"),
    "det.rpn_post_nms_top_n": (lambda v: len(v) == 2 and min(v) > 0, "two numbers > 0 (training, testing)"),
    "det.score_thresh": PROBABILITY,
    "det.nms_thresh": (lambda v: 0 < v <= 1, "{type} in (0, 1]"),
    "det.detections_per_img": POSITIVE,
    "seg.layout": _one_of("ade20k", "folders"),
    "seg.scale": (lambda v: len(v) == 2 and min(v) > 0, "two whole numbers > 0 (long, short)"),
    "seg.ratio_range": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "two numbers 0 < min <= max"),
    "seg.cat_max_ratio": (lambda v: 0 < v <= 1, "{type} in (0, 1]"),
    "seg.stride": NON_NEGATIVE,
    "seg.test_scales": (lambda v: len(v) > 0 and min(v) > 0, "one or more numbers > 0"),
    "seg.channels": POSITIVE,
    "seg.aux_channels": NON_NEGATIVE,
    "seg.aux_weight": NON_NEGATIVE,
    "seg.dropout": FRACTION,
    "seg.pool_scales": (lambda v: len(v) > 0 and min(v) >= 1, "one or more whole numbers >= 1"),
    "seg.out_indices": (lambda v: len(v) in (0, 4) and min(v, default=0) >= 0, "() or four block indexes >= 0"),
    "seg.window_size": NON_NEGATIVE,
    "seg.global_blocks": (lambda v: min(v, default=0) >= 0, "block indexes >= 0"),
}

# Older spellings of a field's words, read as the current word (which is what the config then holds).
WORD_ALIASES: dict[str, dict[str, str]] = {"train.amp": dtypes.ALIASES}


def fit_word(key: str, value: Any) -> Any:
    """`value` of field `key` with an older spelling replaced by the current word."""
    return WORD_ALIASES.get(key, {}).get(value, value) if isinstance(value, str) else value


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
    ("model.name", lambda c: c.train.task != "zero_shot" or find_clip(c.model.name) is not None,
     "an EVA-02-CLIP name for train.task='zero_shot' (see `eva02 list clip`)"),
    ("model.name", lambda c: c.train.task != "mim" or find_clip(c.model.name) is None,
     "an EVA-02 name or variant: a CLIP model is no MIM student (use it as mim.teacher_kind='eva02_clip')"),
    ("model.img_size", lambda c: c.train.task != "detect" or c.model.img_size % 64 == 0,
     "a multiple of 64 for train.task='detect' (the stride of the pyramid's coarsest level)"),
    ("model.num_classes", lambda c: c.train.task != "detect" or c.model.num_classes > 0,
     "the number of object classes (> 0) for train.task='detect'"),
    ("seg.cls_token", lambda c: not (c.seg.window_size and c.seg.cls_token),
     "False with seg.window_size={cfg.seg.window_size} (a class token belongs to no window)"),
    ("seg.aux_weight", lambda c: (c.seg.aux_weight > 0) == (c.seg.aux_channels > 0),
     "> 0 with an auxiliary head (seg.aux_channels > 0), 0 without one (seg.aux_channels=0)"),
    ("seg.stride", lambda c: c.train.task != "segment" or c.seg.stride <= c.model.img_size,
     "a value <= model.img_size={cfg.model.img_size} (the test window), or 0 for whole images"),
    ("data.batch_size", lambda c: c.train.task != "segment" or c.data.batch_size >= 2,
     "2 or more for train.task='segment' (the heads' BatchNorm needs two images per device)"),
    ("data.hf_name", lambda c: c.data.format != "hf" or bool(c.data.hf_name),
     "a save_to_disk folder, a data folder (parquet, ...) or a hub dataset name for data.format='hf'"),
    ("data.format", lambda c: c.data.format == "folder" or c.train.task in ("classify", "mim", "zero_shot"),
     "'folder' for train.task={cfg.train.task!r} (shards and Hugging Face datasets feed classify, mim, zero_shot)"),
    ("data.streaming", lambda c: not c.data.streaming or c.data.format == "wds",
     "False for data.format={cfg.data.format!r} (only tar shards stream: data.format='wds')"),
    ("data.decode_on_device", lambda c: not c.data.decode_on_device or (c.data.fast_transforms and c.data.randaug_n == 0
                                                                         and c.data.reprob == 0
                                                                         and c.train.task in UINT8_TASKS),
     "False with data.fast_transforms={cfg.data.fast_transforms}, data.randaug_n={cfg.data.randaug_n}, "
     "data.reprob={cfg.data.reprob}, train.task={cfg.train.task!r} (JPEGs are decoded on the device for the fast "
     "train transform, data.fast_transforms=true, with neither RandAugment nor random erasing, which run per image "
     "on the CPU: set data.randaug_n=0 and data.reprob=0; classify and mim only)"),
]  # fmt: skip


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def section_problems(sub: Any, section: str) -> list[str]:
    """Fit each field of a section to its annotated type (5 -> 5.0, [a, b] -> (a, b)) and check its rule."""
    problems = []
    for name, tp in _hints(type(sub)).items():
        key = f"{section}.{name}"
        try:
            value = fit_word(key, coerce(getattr(sub, name), tp, key, text=False))
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
    for name, tp in _hints(type(cfg)).items():
        sub = getattr(cfg, name)
        if not isinstance(sub, tp):
            problems.append(f"{name}={sub!r}: expects {tp.__name__}(...)")
        else:
            problems += section_problems(sub, name)
    if not problems:
        problems = [
            f"{k}={get_value(cfg, k)!r}: expects {t.format(cfg=cfg)}" for k, check, t in CROSS_RULES if not check(cfg)
        ]
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------ key access
def get_value(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def unknown_key(sections: dict[str, type], section: str, name: str) -> ConfigError:
    """The error for key 'section.name' that is not a field of the config whose sections are `sections`."""
    if section not in sections:
        return ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(sections)}")
    valid = ", ".join(_hints(sections[section]))
    return ConfigError(f"unknown config key '{section}.{name}'; valid keys in {section}: {valid}")


def _lookup(cfg: RunConfig, key: str) -> tuple[str, str, Any]:
    """Split 'a.b' and return (section, field, annotated type), or raise listing the valid keys."""
    section, _, name = key.partition(".")
    sections = _hints(type(cfg))
    if section not in sections or name not in _hints(sections[section]):
        raise unknown_key(sections, section, name)
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
