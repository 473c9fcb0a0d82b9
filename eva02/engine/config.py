"""Typed run configuration: frozen dataclasses, config files, and checked `--cfg-options a.b=v` overrides.

A config file is Python that defines `config = RunConfig(...)`; it may load another file with
`load_config` and derive from it with `override`. Defaults are the official EVA-02 fine-tuning recipe
(`EVA-02/asuka/README.md`, `run_class_finetuning.py`): AdamW, wd 0.05, betas (0.9, 0.999), per-step
cosine to 0 after linear warmup, RandAugment m9/mstd0.5, no mixup/cutmix/erasing, EMA 0.9999.

Every value is checked, whether it comes from a Python config file, a saved config.json or `--set`:
each section brings its fields to their annotated types and checks them against `RULES` when it is
built (so also on every `override`), and `check_config` adds the checks that span fields; the rules
and the checking code live in `eva02.engine.config_check`. A failure is a `ConfigError`: one line
naming the source, the dotted field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import runpy
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eva02 import fileio
from eva02.engine.config_check import (  # noqa: F401 (the checking API, re-exported)
    CROSS_RULES,
    RULES,
    TEACHER_KINDS,
    ConfigError,
    _hints,
    check_config,
    coerce,
    fit_word,
    get_value,
    override,
    parse_options,
    section_problems,
    unknown_key,
)
from eva02.weights.zoo import CLIP_MEAN, CLIP_STD  # the one definition of the CLIP statistics


class _Section:
    """Base of the config sections: fields are fitted to their types and checked when a section is built."""

    def __post_init__(self) -> None:
        problems = section_problems(self, _section_name(type(self)))
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class ModelCfg(_Section):
    """Which network to build and where its initial weights come from."""

    name: str = "tiny"  # a zoo name of the reference page or of EVA-02-CLIP, or a variant of eva02.model.VARIANTS
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
    """Datasets (class folders, list files, tar shards or Hugging Face datasets) and the train/eval transforms."""

    # 'folder': class folders, or a list file when one is set or present (below); 'list': a list file, required;
    # 'wds': WebDataset tar shards (`eva02 shard`); 'hf': a Hugging Face dataset (the `datasets` library)
    format: str = "folder"
    root: str = "data/imagenet"  # mmpretrain's layout: {root}/{split}/ images, {root}/meta/{split}.txt lists
    train_split: str = "train"  # also the split name of 'hf' datasets, and {root}/{split} holds 'wds' shards
    val_split: str = "val"  # '' for no validation
    train_list: str = ""  # 'relative/path label' lines; '' uses {root}/meta/{split}.txt if present, else folders
    val_list: str = ""
    class_names: str = ""  # file with one class name a line ('' = folder names, or 'class_<i>' for lists)
    # 'wds': a shard folder with manifest.json, a manifest, or a brace pattern of tars, URLs or pipe: commands
    # ('' = {root}/{train_split} resp. {root}/{val_split})
    train_shards: str = ""
    val_shards: str = ""
    shard_cache: str = ""  # 'wds': where shards named by URL or pipe: are fetched ('' = $EVA02_HOME/shards)
    # 'wds': stream the train shards (paths, URLs, pipe: commands) instead of indexing them (URLs: no local
    # copy); order from (seed, epoch), exact resume with the same processes and workers (docs/data.md)
    streaming: bool = False
    shuffle_buffer: int = 1000  # streaming: samples held to shuffle within a shard (0 or 1: stored order)
    hf_name: str = ""  # 'hf': a save_to_disk folder, a local data folder (parquet, ...) or a hub dataset name
    hf_image: str = "image"  # 'hf': the image column
    hf_label: str = "label"  # 'hf': the label column (a ClassLabel names the classes); '' for none (MIM)
    batch_size: int = 16  # per device; global batch = batch_size x devices x accumulation
    eval_batch_size: int = 0  # 0: same as batch_size
    workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    fast_transforms: bool = True  # train transform on uint8 tensors, same random draws as the reference (docs/data.md)
    reduced_decode: bool = True  # fast_transforms: JPEGs decoded at 1/2-1/8 size where the crop keeps >= img_size px
    # uint8 train batches normalised where the loop runs (the device), wherever the train transform allows it (the
    # fast one without random erasing, classify and mim); otherwise the workers normalise (docs/data.md)
    device_normalize: bool = True
    # fast_transforms, no RandAugment, no erasing: train JPEGs decoded, cropped and normalised on the device (nvJPEG
    # on a GPU), other images in the workers (docs/data.md); includes device_normalize's step
    decode_on_device: bool = False
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
    """Per-step decay from lr to min_lr after a linear warmup from warmup_lr: a half-cosine (the official
    EVA-02 recipes) or a polynomial (`kind='poly'`, power 1 a straight line: the official seg runs)."""

    epochs: int = 100
    warmup_epochs: float = 5.0
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    kind: str = "cosine"  # 'cosine' or 'poly'
    power: float = 1.0  # the polynomial's exponent (kind 'poly')


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

    amp: str = "fp32"  # 'fp32' | 'bf16' | 'fp16' autocast (fp16 uses dynamic loss scaling); 'none' reads as 'fp32'
    parallel: str = "ddp"  # 'ddp' | 'fsdp' (FSDP2 fully_shard per block; for the large models)
    # BatchNorm layers (the segmentation heads') become SyncBatchNorm under DDP on CUDA, as the official
    # seg runs' SyncBN; a CPU (gloo) or FSDP2 run keeps per-process BatchNorm and says so once
    sync_bn: bool = True
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    eval_every_epochs: int = 1  # 0: evaluate after the last epoch only
    log_every: int = 10  # optimizer steps between metric lines
    max_steps: int = 0  # stop after this many optimizer steps (0: all epochs); for smoke runs
    threads: int = 0  # CPU threads per process for torch ops (0: the cores free at start, see eva02/threads.py)
    task: str = "classify"  # a name of eva02.engine.tasks.TASKS: 'classify' (fine-tuning), 'mim' (pre-training)
    dist_timeout_s: float = 600.0  # torch.distributed collective timeout (seconds) before a stuck rank fails


@dataclass(frozen=True)
class MimCfg(_Section):
    """Teacher and masking of a pre-training run (official recipe: EVA01-CLIP-g/14, 105 of 256 patches)."""

    # 'open_clip' (EVA-CLIP towers through open_clip), 'eva02_clip' (our EVA-02-CLIP image towers) or
    # 'eva02' (our models / checkpoints)
    teacher_kind: str = "open_clip"
    teacher_name: str = "EVA01-g-14"  # open_clip model name, an EVA-02-CLIP name or file, or an eva02 zoo name
    # open_clip: a pretrained tag or a local file; eva02: '' random, 'pretrained' zoo weights, or a file
    teacher_pretrained: str = "laion400m_s11b_b41k"
    teacher_amp: str = "bf16"  # teacher autocast dtype on CUDA: 'bf16', 'fp16' or 'none'
    target_dim: int = 0  # 0: the teacher's feature width (1024 for EVA01-CLIP-g)
    num_masking: int = 105  # patches masked per image (for the 16x16 grid; scaled for other grids)
    min_num: int = 16
    max_num: int = 0  # 0: no cap beyond num_masking
    min_aspect: float = 0.3


@dataclass(frozen=True)
class ClipCfg(_Section):
    """Prompts for EVA-02-CLIP: zero-shot evaluation (train.task 'zero_shot') and the zero-shot head that
    initialises a classifier fine-tuned from a CLIP model (model.name an EVA-02-CLIP name)."""

    # 'imagenet': CLIP's 1000 ImageNet-1k names, by label index; a file with one name a line; '' the
    # dataset's class names (data.class_names, else the class folders, '_' read as a space)
    class_names: str = ""
    # 'imagenet': the 80 CLIP prompt templates; a file with one template a line; or one template with {}
    templates: str = "imagenet"


@dataclass(frozen=True)
class SegCfg(_Section):
    """Semantic segmentation (train.task 'segment', EVA-02 + UperNet): data layout and transforms, heads,
    backbone layout, test-time windows. The classes are `model.num_classes`; `model.img_size` is both the
    training crop and the test window. Defaults: the official ADE20K recipe of EVA-02-B (`EVA-02/seg`)."""

    layout: str = "ade20k"  # 'ade20k': images/SPLIT/*.jpg + annotations/SPLIT/*.png; 'folders': images/ + masks/
    reduce_zero_label: bool = True  # label 0 is 'other': ignored, 1..N become 0..N-1 (ADE20K)
    class_names: str = ""  # file with one name a line; '' = ADE20K's names (layout 'ade20k', 150 classes) or class_<i>
    scale: tuple[int, ...] = (2048, 512)  # (long, short) side bounds of the resize (train: times a random ratio)
    ratio_range: tuple[float, ...] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # a train crop in which no class holds this share of the labelled pixels
    photometric: bool = True  # brightness / contrast / saturation / hue distortion of train images
    stride: int = 341  # test windows of model.img_size this far apart; 0: whole images at once
    test_scales: tuple[float, ...] = (1.0,)  # several: multi-scale test (official 0.5, 0.75, ..., 1.75)
    test_flip: bool = False
    channels: int = 768  # UperNet width (official: B 768, L 1024, L at 640 px 1536)
    aux_channels: int = 256  # FCN auxiliary head width; 0: no auxiliary head
    aux_weight: float = 0.4  # weight of the auxiliary head's loss (0 exactly when there is no auxiliary head)
    dropout: float = 0.1
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    out_indices: tuple[int, ...] = ()  # the 4 blocks feeding the pyramid; () = official (B 3,5,7,11; L 7,11,15,23)
    window_size: int = 0  # backbone attention windows (ViTDet layout); 0: global attention as the official seg
    global_blocks: tuple[int, ...] = ()  # with window_size: blocks attending globally; () = one per depth quarter
    cls_token: bool = True  # the official seg backbone keeps the class token in the sequence; False with windows


@dataclass(frozen=True)
class DetCfg(_Section):
    """Object detection and instance segmentation (train.task 'detect': Mask R-CNN on the dense backbone,
    ViTDet): annotation files, backbone layout, large-scale jitter, anchors, heads and test-time output.
    The object classes are `model.num_classes`, the square input `model.img_size`; images are
    {data.root}/{data.*_split}/. Defaults: the official EVA-02 COCO recipe's (`EVA-02/det`, ViTDet)."""

    train_ann: str = ""  # COCO instances json; '' = {data.root}/annotations/instances_{data.train_split}.json
    val_ann: str = ""  # '' = {data.root}/annotations/instances_{data.val_split}.json
    masks: bool = True  # Mask R-CNN; False: Faster R-CNN (boxes only)
    window_size: int = 16  # backbone attention windows (ViTDet layout)
    global_blocks: tuple[int, ...] = ()  # blocks attending globally; () = the last of each depth quarter
    lsj_scale: tuple[float, ...] = (0.1, 2.0)  # large-scale jitter: images fit s x model.img_size, s in this range
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per pyramid level p2-p6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    out_channels: int = 256  # pyramid maps and head convolutions
    roi_batch_per_image: int = 512  # proposals sampled per image to train the box and mask heads
    rpn_pre_nms_top_n: tuple[int, ...] = (2000, 1000)  # RPN proposals per level before NMS (training, testing)
    rpn_post_nms_top_n: tuple[int, ...] = (1000, 1000)  # RPN proposals per image after NMS (training, testing)
    score_thresh: float = 0.05  # test time: detections scored below are dropped
    nms_thresh: float = 0.5
    detections_per_img: int = 100


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
    clip: ClipCfg = field(default_factory=ClipCfg)  # used with EVA-02-CLIP models
    det: DetCfg = field(default_factory=DetCfg)  # used when train.task == 'detect'
    seg: SegCfg = field(default_factory=SegCfg)  # used when train.task == 'segment'

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


@functools.cache
def _section_name(cls: type) -> str:
    names = {tp: name for name, tp in _hints(RunConfig).items()}
    return next(names[c] for c in cls.__mro__ if c in names)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v


def changed_keys(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Dotted keys whose value in `cfg` differs from a saved `to_dict()` (keys absent there are skipped)."""
    out = []
    for sec, sub in cfg.to_dict().items():
        for k, v in sub.items():
            old = fit_word(f"{sec}.{k}", saved.get(sec, {}).get(k, v))  # an older spelling is no change
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
        return ConfigError(unknown_key(_hints(RunConfig), sections[m[1]], m[2]).problems, source, str(p))
    if m and m[1] == "RunConfig":
        return ConfigError(unknown_key(_hints(RunConfig), m[2], "").problems, source, str(p))
    return ConfigError(f"{type(e).__name__}: {e.msg if isinstance(e, SyntaxError) else e}", source, str(p))


def load_run(path: str | os.PathLike) -> tuple[RunConfig, Any]:
    """A config file's `config` and, if it defines one, its `task` object, else None (the loop then takes the
    task that `train.task` of the final config names, `eva02.engine.tasks.task_for`).

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
        return cfg, None
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
    return cfg, ns.get("task")


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
