"""Classification datasets: ImageNet-style class folders and list files, with corrupt images skipped.

- Folders: `root/<class>/<image>`; classes are the sorted folder names (label = position).
- List files (mmpretrain's `meta/train.txt`): one `relative/path label` per line, paths relative to a
  data prefix; class names from a names file (one per line) or `class_<i>`.
- Records (`RecordDataset`): the base of the tar-shard and Hugging Face readers (`shards.py`, `hf.py`).
A sample that fails to load comes back as a `BadSample` and is dropped by `collate`; the loop counts
them, names them in a warning, and stops when more than the configured fraction is bad.
Samplers yield `(index, seed)` keys so that augmentation is a function of (seed, epoch, index) only
(`SeededDataset.apply`, shared by all of them): independent of the number of workers or processes, and
identical after a resume.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from eva02.data.device_decode import stack_images
from eva02.data.images import IMAGE_EXTENSIONS, ImageError, deferred_jpeg_decoding, load_image


@dataclass(frozen=True)
class BadSample:
    path: str
    reason: str


def scan_folders(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs and class names from `root/<class>/**/<image>`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist; set data.root / data.*_split")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = []
    for label, name in enumerate(classes):
        seen: set[tuple[int, int]] = set()  # (device, inode) of folders walked: a symlink loop is walked once
        for dirpath, dirnames, files in os.walk(root / name, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(files):
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith("."):
                    samples.append((os.path.join(dirpath, f), label))
    return samples, classes


def read_list(list_file: str | os.PathLike, prefix: str | os.PathLike) -> list[tuple[str, int]]:
    """Parse `relative/path label` lines (blank lines and '#' comments skipped); paths join `prefix`."""
    samples = []
    lf = Path(list_file)
    if not lf.is_file():
        raise FileNotFoundError(f"list file {str(lf)!r} does not exist; set data.train_list / data.val_list")
    for n, line in enumerate(lf.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.rpartition(" ")
        if not path or not label.lstrip("-").isdigit():
            raise ValueError(f"{lf}:{n}: expected 'relative/path label', got {line!r}")
        samples.append((os.path.join(prefix, path.strip()), int(label)))
    return samples


def read_names(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class names file {str(p)!r} does not exist; set data.class_names")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def takes_encoded(transform: Any) -> bool:
    """Whether `transform`, or one it wraps (as `.transform`), decodes JPEGs itself (`takes_encoded = True`,
    e.g. `fast_transforms.FastTrainTransform`): it is then given them undecoded (`images.EncodedImage`)."""
    while transform is not None:
        if getattr(transform, "takes_encoded", False):
            return True
        transform = getattr(transform, "transform", None)
    return False


class SeededDataset(Dataset):
    """A dataset whose augmentation is a function of the sampler's key: `apply` seeds `transform`."""

    transform: Callable

    def decoding(self) -> contextlib.AbstractContextManager:
        """The context to read images in: JPEGs left undecoded when the transform decodes them itself."""
        return deferred_jpeg_decoding() if takes_encoded(self.transform) else contextlib.nullcontext()

    def apply(self, img: Image.Image, seed: int | None) -> Any:
        """`transform(img)`; with the key's seed (`sample_seed`), torch and `random` are seeded by it for the
        call, and the caller's random streams stay as they were."""
        if seed is None:
            return self.transform(img)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also (re)seed every GPU's, which the fork does not
            # restore, and costs more than a small image's crop (it records a stack trace per device type).
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            out = self.transform(img)
        random.setstate(py_state)
        return out


class ImageDataset(SeededDataset):
    """(path, label) samples -> (image tensor, label, index), or BadSample when the image is unusable."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Callable) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            with self.decoding():
                img = load_image(path)
            return self.apply(img, seed), label, index  # a deferred JPEG's data errors come from here
        except (ImageError, OSError) as e:
            return BadSample(path, str(e))

    def check_not_empty(self, what: str) -> None:
        if not self.samples:
            raise ValueError(
                f"the {what} dataset is empty: no images found; expected class folders (root/<class>/<image>) "
                "or a list file of 'relative/path label' lines"
            )

    def check(self, num_classes: int, what: str) -> None:
        """Errors before training starts: empty dataset, labels outside [0, num_classes), missing files."""
        self.check_not_empty(what)
        bad = next(((p, lab) for p, lab in self.samples if not 0 <= lab < num_classes), None)
        if bad is not None:
            raise ValueError(
                f"the {what} dataset has label {bad[1]} (for {bad[0]!r}) outside [0, {num_classes}); "
                "fix the list file or set model.num_classes"
            )
        missing = [p for p, _ in self.samples if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"the {what} dataset lists {len(missing)} missing file(s), e.g. {missing[0]!r}; "
                "check the data prefix (data.root / data.*_split)"
            )


class RecordDataset(SeededDataset):
    """Records (shard samples, dataset rows) -> (image tensor, label, index), or BadSample when the image is
    unusable; augmented as `ImageDataset` is. Subclasses implement `read` and `labels`."""

    classes: list[str]
    labelled: bool
    label_map: list[int] | None = None  # validation labels renamed to train labels (`align_classes`)

    def read(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label of record `index`; ImageError for an unusable image."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        return f"record {index}"

    def labels(self) -> set[int]:
        """The labels that occur (before `align_classes`)."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            with self.decoding():
                img, label = self.read(index)
            out = self.apply(img, seed)  # a deferred JPEG's data errors come from here
        except ImageError as e:
            return BadSample(self.name(index), str(e))
        if self.label_map is not None:
            label = self.label_map[label]
        return out, label, index

    def check_not_empty(self, what: str) -> None:
        if len(self) == 0:
            raise ValueError(f"the {what} dataset is empty")

    def check(self, num_classes: int, what: str) -> None:
        """Errors before training: empty, unlabelled, or labels outside [0, num_classes)."""
        self.check_not_empty(what)
        if not self.labelled:
            raise ValueError(f"the {what} dataset has no labels (a plain folder's images); classifying needs "
                             "class folders or a list file behind it")  # fmt: skip
        labels = self.labels()
        if self.label_map is not None:
            labels = {self.label_map[lab] for lab in labels}
        bad = [lab for lab in labels if not 0 <= lab < num_classes]
        if bad:
            raise ValueError(f"the {what} dataset has label {min(bad)} outside [0, {num_classes}); "
                             "fix the dataset's labels or set model.num_classes")  # fmt: skip

    def align_classes(self, classes: list[str]) -> None:
        """Give each class the label of the same name in `classes` (validation against train)."""
        unknown = sorted(set(self.classes) - set(classes))
        if unknown:
            raise ValueError(f"validation classes {unknown[:5]} are not train classes; both need the same names")
        index = {c: i for i, c in enumerate(classes)}
        self.label_map = [index[c] for c in self.classes]
        self.classes = list(classes)


def build_dataset(root: str, split: str, list_file: str, names_file: str, transform: Callable) -> ImageDataset:
    """mmpretrain layout: list file (given, or `{root}/meta/{split}.txt` if present) else class folders."""
    prefix = os.path.join(root, split)
    auto_list = os.path.join(root, "meta", f"{split}.txt")
    lf = list_file or (auto_list if os.path.isfile(auto_list) else "")
    if lf:
        samples = read_list(lf, prefix)
        n = max((lab for _, lab in samples), default=-1) + 1
        classes = read_names(names_file) if names_file else [f"class_{i}" for i in range(n)]
    else:
        samples, classes = scan_folders(prefix)
        if names_file:
            names = read_names(names_file)
            if len(names) != len(classes):
                raise ValueError(f"{names_file!r} has {len(names)} names but {prefix!r} has {len(classes)} folders")
            classes = names
    return ImageDataset(samples, classes, transform)


def split_bad(items: list) -> tuple[list, list[tuple[str, str]]]:
    """Loaded samples, and (path, reason) of the ones that failed to load (`BadSample`)."""
    good = [it for it in items if not isinstance(it, BadSample)]
    return good, [(it.path, it.reason) for it in items if isinstance(it, BadSample)]


def collate(items: list) -> dict:
    """Stack good samples; failures are listed under 'bad' as (path, reason) for the loop to report."""
    good, bad = split_bad(items)
    if not good:
        return {"images": None, "targets": None, "index": None, "bad": bad}
    imgs, targets, index = zip(*good, strict=True)
    return {
        # default_collate stacks the images as torch.stack does, but in a DataLoader worker straight into the
        # shared memory the batch travels through to the main process: one copy of the largest tensor saved;
        # JPEGs left to the device (`device_decode.EncodedCrop`) are packed for it instead
        "images": stack_images(imgs),
        "targets": torch.as_tensor(targets, dtype=torch.long),
        "index": torch.as_tensor(index, dtype=torch.long),
        "bad": bad,
    }


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # Distinct, reproducible stream per (run seed, epoch, sample); large odd multipliers avoid overlaps.
    return (seed * 1_000_003 + epoch * 7_919_999 + index * 2_654_435_761) % (2**63 - 1)


class TrainSampler(Sampler):
    """Epoch-seeded shuffle shared by all ranks, cut to whole global batches, dealt out rank by rank.

    Rank r gets positions r, r + world, ... of the permutation (as DistributedSampler), so global batch g
    is always the same set of samples, perm[g*G:(g+1)*G], for any world size and accumulation.
    `start_step` skips the global batches already trained in this epoch (resume mid-epoch).
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start_step) * self.global_batch // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        perm = perm[self.start_step * self.global_batch : self.steps_per_epoch() * self.global_batch]
        for i in perm[self.rank :: self.world]:
            yield i, sample_seed(self.seed, self.epoch, i)


class EvalSampler(Sampler):
    """Every sample once over all ranks; ranks are padded to equal length with keys >= n (dropped later)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world
        self.per_rank = -(-n // world)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        for j in range(self.per_rank):
            yield j * self.world + self.rank  # may be >= n: a padding key


class PaddedDataset(Dataset):
    """Maps padding keys (>= len) back onto real samples; `collate` output keeps the raw key in 'index'."""

    def __init__(self, ds: ImageDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int):
        out = self.ds[key % len(self.ds)]
        return out if isinstance(out, BadSample) else (out[0], out[1], key)
