"""Masked-image-modelling pre-training as a task of the shared training loop (`eva02.engine.train`).

Official recipe (EVA-02 `asuka/run_eva02_pretraining.py`, `engine_for_pretraining.py`): one augmented
view (RandomResizedCrop scale (0.2, 1), flip, no RandAugment) goes to both the student and the frozen
teacher; a block-wise mask (105 of 16x16 patches) is drawn per image; the loss is the negative cosine
similarity between the student's predictions and the teacher's patch features at masked positions.
Masks are sampled inside the dataset's seeded transform, so they depend only on (seed, epoch, index):
resumable and independent of the number of workers or processes, like every other augmentation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from eva02.data.datasets import ImageDataset, build_dataset, split_bad
from eva02.data.device_decode import stack_images
from eva02.data.hf import hf_dataset
from eva02.data.images import iter_image_paths
from eva02.data.masking import BlockMaskGenerator
from eva02.data.shards import shard_dataset
from eva02.dtypes import autocast_dtype
from eva02.engine.tasks.base import build_eva02, model_config
from eva02.model import Eva02
from eva02.model.mim import Eva02MIM, backbone_state_dict, cosine_loss
from eva02.model.teacher import (
    ClipTowerTeacher,
    Eva02Teacher,
    FrozenTeacher,
    build_open_clip_teacher,
    import_open_clip,
)
from eva02.weights.clip import get_clip
from eva02.weights.download import DownloadError, cached_path, download
from eva02.weights.load import get_model
from eva02.weights.zoo import WeightSource

if TYPE_CHECKING:
    from eva02.engine.config import MimCfg, RunConfig

# open_clip's file names on the hub when a pretrained tag names only a repository (safetensors first).
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_clip_weights(name: str, tag: str) -> str:
    """A local file for open_clip model `name` with pretrained `tag`: `tag` itself when it is a file, else
    the file open_clip's table names on the Hugging Face hub, fetched once and verified through our
    download code (`eva02.weights.download`). Offline, one error says how to go on; no retry loop."""
    if not tag or os.path.isfile(tag):
        return tag
    cfg = import_open_clip().get_pretrained_cfg(name, tag)
    if not cfg:
        raise ValueError(
            f"open_clip knows no pretrained tag {tag!r} for {name!r}; set mim.teacher_pretrained to one of its tags "
            "(open_clip.list_pretrained()) or to a local file"
        )
    if cfg.get("file"):
        return cfg["file"]
    repo, fname = os.path.split(cfg.get("hf_hub", "").rstrip())
    if repo:
        urls = [f"https://huggingface.co/{repo}/resolve/main/{f}" for f in ((fname,) if fname else OPEN_CLIP_FILES)]
    else:
        urls = [cfg["url"]]
    sources = [WeightSource("open_clip", u, f"open_clip--{name}--{tag}--{os.path.basename(u)}") for u in urls]
    cached = [s for s in sources if cached_path(s).is_file()]
    last = None
    for source in cached or sources:
        try:
            return str(download(source))
        except DownloadError as e:
            last = e
            if getattr(e, "reason", "") != "HTTP 404":  # offline or refused: the next name would fail alike
                break
    raise ValueError(
        f"cannot get the MIM teacher's weights (open_clip {name} {tag}) from {getattr(last, 'url', urls[0])} "
        f"({getattr(last, 'reason', last)}); offline, fetch that file elsewhere and set mim.teacher_pretrained=FILE "
        f"(or put it at {getattr(last, 'dest', '')}), or use mim.teacher_kind=eva02 with one of our models"
    ) from None


class MaskedView:
    """Dataset transform: image -> (augmented tensor, (grid*grid,) bool mask), both from the seeded RNG."""

    def __init__(self, transform: Any, masks: BlockMaskGenerator) -> None:
        self.transform = transform
        self.masks = masks

    def __call__(self, img: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.transform(img)
        # The dataset seeds torch per (seed, epoch, index) around this call; the mask draws from that.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        return x, torch.from_numpy(self.masks(rng).reshape(-1))


def plain_folder(root: str | os.PathLike) -> list[tuple[str, int]]:
    """Every image below `root` (sorted, hidden files skipped) with label 0: pre-training needs no labels."""
    return [(str(p), 0) for p in iter_image_paths(root)]


def build_mim_dataset(cfg: RunConfig, transform: Any) -> Dataset:
    """The train images: a list file, class folders, or a plain folder of images; tar shards (data.format
    'wds') or a Hugging Face dataset ('hf'). Labels are unused."""
    d = cfg.data
    if d.format in ("wds", "hf"):
        if d.format == "wds":
            spec = d.train_shards or os.path.join(d.root, d.train_split)
            ds = shard_dataset(spec, transform, d.shard_cache, "", d.streaming, d.shuffle_buffer)
        else:  # no label column needed
            ds = hf_dataset(d.hf_name, d.train_split, transform, d.hf_image, "")
        if len(ds) == 0:
            raise ValueError(f"the train data of data.format={d.format!r} holds no images")
        return ds
    folder = Path(d.root) / d.train_split
    auto_list = Path(d.root) / "meta" / f"{d.train_split}.txt"
    has_classes = folder.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
    if d.train_list or auto_list.is_file() or has_classes:
        ds = build_dataset(d.root, d.train_split, d.train_list, "", transform)
    else:
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist; set data.root / data.train_split")
        ds = ImageDataset(plain_folder(folder), ["image"], transform)
    if not ds.samples:
        raise ValueError(f"no images found under {str(folder)!r}; pre-training takes any folder of images")
    return ds


def collate_masked(items: list) -> dict[str, Any]:
    """Stack (image, mask) samples; unreadable ones are listed under 'bad' for the loop to report."""
    good, bad = split_bad(items)
    if not good:
        return {"images": None, "mask": None, "index": None, "bad": bad}
    views, _, index = zip(*good, strict=True)
    images, masks = zip(*views, strict=True)
    return {
        # in a DataLoader worker: stacked into shared memory, as `collate` (JPEGs left to the device: packed)
        "images": stack_images(images),
        "mask": default_collate(list(masks)),
        "index": torch.as_tensor(index, dtype=torch.long),
        "bad": bad,
    }


def build_teacher(m: MimCfg) -> FrozenTeacher:
    """The frozen teacher of a run: an open_clip EVA-CLIP tower, our EVA-02-CLIP image tower, or one of our
    models / checkpoints."""
    amp = autocast_dtype(m.teacher_amp)
    if m.teacher_kind == "open_clip":
        return build_open_clip_teacher(m.teacher_name, open_clip_weights(m.teacher_name, m.teacher_pretrained), amp)
    p = m.teacher_pretrained
    if m.teacher_kind == "eva02_clip":  # our EVA-02-CLIP image tower: a zoo name (or alias), or our CLIP file
        if Path(m.teacher_name).is_file():
            return ClipTowerTeacher(get_clip(None, pretrained=m.teacher_name).visual, amp_dtype=amp)
        if p and p != "pretrained" and not Path(p).is_file():
            raise FileNotFoundError(f"mim.teacher_pretrained {p!r}: no such file; give a CLIP file or 'pretrained'")
        clip = get_clip(m.teacher_name, pretrained=(True if p == "pretrained" else p) if p else False)
        return ClipTowerTeacher(clip.visual, amp_dtype=amp)
    if p and p != "pretrained" and not Path(p).is_file():
        raise FileNotFoundError(f"mim.teacher_pretrained {p!r}: no such file; give a checkpoint path or 'pretrained'")
    if Path(m.teacher_name).is_file():  # one of our checkpoints, architecture from its metadata
        model = get_model(None, pretrained=m.teacher_name)
    else:
        model = get_model(m.teacher_name, pretrained=(True if p == "pretrained" else p) if p else False)
    return Eva02Teacher(model, amp_dtype=amp)


class MimLoss(nn.Module):
    """Negative cosine similarity between the student's predictions and the frozen teacher's patch
    features at the masked positions."""

    def __init__(self, teacher: FrozenTeacher, patch_size: int) -> None:
        super().__init__()
        self.teacher = teacher
        self.patch_size = patch_size

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        images, mask = batch["images"], batch["mask"]
        p = self.patch_size
        target = self.teacher(images, (images.shape[-2] // p, images.shape[-1] // p))  # (B, N, T) fp32, no grad
        pred = model(images, mask)  # (M, T) at masked positions only
        return cosine_loss(pred, target[mask])


class MimTask:
    """EVA-02 pre-training: `Eva02MIM` student, frozen teacher, masked cosine loss; no validation metric
    (the training loss is the signal), and the run's deliverable is the headless backbone."""

    best_metric = None
    shown_metrics = ()

    def __init__(self, mim: MimCfg | None = None) -> None:
        self.mim = mim
        # A cache, not state: the teacher of the settings last asked for (building one can take minutes).
        self.teacher: FrozenTeacher | None = None
        self._teacher_of: MimCfg | None = None

    def settings(self, cfg: RunConfig) -> MimCfg:
        """The run's MIM settings: those given to this task, else the config's `mim` section."""
        return self.mim if self.mim is not None else cfg.mim

    def masks(self, cfg: RunConfig) -> BlockMaskGenerator:
        m = self.settings(cfg)
        c = model_config(cfg)
        n = c.grid * c.grid
        # The recipe's numbers are for 16x16 patches; other grids keep the masked fraction and block share.
        scale = n / 256
        num = max(1, round(m.num_masking * scale)) if n != 256 else m.num_masking
        min_num = max(1, min(num, round(m.min_num * scale))) if n != 256 else m.min_num
        max_num = m.max_num or None
        return BlockMaskGenerator((c.grid, c.grid), num, min_num, max_num, m.min_aspect)

    def get_teacher(self, cfg: RunConfig) -> FrozenTeacher:
        """The frozen teacher of the run's settings, built once and reused while they stay the same."""
        m = self.settings(cfg)
        if self.teacher is None or self._teacher_of != m:
            self.teacher, self._teacher_of = build_teacher(m), m
        return self.teacher

    def build_model(self, cfg: RunConfig, load_init: bool = True) -> nn.Module:
        if cfg.model.num_classes != 0:
            raise ValueError("pre-training trains a headless backbone: set model.num_classes=0")
        m = self.settings(cfg)
        width = self.get_teacher(cfg).out_dim
        if m.target_dim and m.target_dim != width:
            raise ValueError(f"mim.target_dim={m.target_dim} differs from the teacher's width {width}; set it to 0")
        mim = Eva02MIM(build_eva02(cfg, load_init=False), width)  # the official JAX-style init
        if load_init and cfg.model.init:  # continue from a checkpoint: backbone weights replace the init
            mim.backbone.load_state_dict(build_eva02(cfg, load_init=True).state_dict())
        return mim

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, None]:
        from eva02.data.fast_transforms import train_transform_for  # torchvision: loaded with the data only

        tt = train_transform_for(cfg.data, cfg.model.img_size)
        return build_mim_dataset(cfg, MaskedView(tt, self.masks(cfg))), None

    def collate(self, items: list) -> dict[str, Any]:
        return collate_masked(items)

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        return MimLoss(self.get_teacher(cfg), model_config(cfg).patch_size)

    def evaluate(
        self, cfg: RunConfig, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None
    ) -> dict[str, Any]:
        return {}

    def export_model(self, cfg: RunConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """The headless backbone (mask token and regressor dropped): the init of every fine-tune config."""
        if not any(k.startswith("backbone.") for k in state_dict):
            raise ValueError("not the state of a pre-training model (no backbone.* weights)")
        backbone = Eva02(model_config(cfg))
        backbone.load_state_dict(backbone_state_dict(state_dict), strict=True)
        return backbone
