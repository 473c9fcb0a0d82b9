"""Input-pipeline speed per CPU core: decoding plus the official train augmentation, ours against timm's
loader in the same run, from an image folder and from tar shards.

Data: JPEGs cut from a mosaic of scikit-image's sample photos at their own pixel density (so the JPEG
entropy is a photo's, not an upscaled one's), in two sets: 'imagenet' (500x375, 375x500, 500x333, 333x500,
500x500; JPEG qualities 75 / 90 / 96, as ImageNet's train images) and 'large' (1024x768, 1600x1200,
1200x1600, 2048x1536). Each set is written as class folders and as shards by the project's shard writer
(`eva02 shard`).

Recipes: 'ft448', the official fine-tuning augmentation at 448 px (RandomResizedCrop scale (0.08, 1) bicubic,
flip, RandAugment rand-m9-mstd0.5-inc1, no random erasing), and 'mim224', the MIM pre-training view at
224 px (RandomResizedCrop scale (0.2, 1) bicubic, flip). Loaders, each a torch DataLoader with one torch
thread, batches of --batch, for one epoch, either in this process (--workers 0: everything on one core)
or with --workers N worker processes (the batches then travel through shared memory, as in training); the
CPU time counted is this process's and its workers':

- timm: `timm.data.create_dataset` + `create_loader` with the same augmentation (`use_prefetcher=True`,
  its default: uint8 batches normalised to float in the prefetcher, here on the CPU, counted); shards
  through timm's WebDataset reader;
- timm-u8: the uint8 batches of the same loader, before its prefetcher: timm's CPU work when the GPU
  normalises;
- ref: our reference transform (`train_transforms.train_transform`, torchvision v2 on PIL images);
- fast: our fast transform (`fast_transforms.FastTrainTransform`) with full-size decoding;
- fast+reduced: the same with reduced-size JPEG decoding where the crop allows it (the engine's default);
- fast-u8: fast+reduced returning uint8 images (`normalize=False`), against timm-u8;
- fast-u8+norm: fast-u8 with each batch normalised in the loading process by the engine's step
  (`engine.loader.DeviceNormalize`, what a CPU run does with `data.device_normalize`, the default), against
  timm, whose prefetcher does the same there.

The variants are interleaved within each repeat, their order rotating, and each repeat draws other
augmentations (seed = repeat); reported are medians over the repeats of images per CPU-second (process
time: per core, robust to other jobs' load) and of wall-clock images per second, and the median over
repeats of each variant's ratio to timm (to timm-u8 for fast-u8) in the same repeat.

    python benchmarks/loader_bench.py [--images 192] [--repeats 5] [--batch 32] [--sets imagenet large]
        [--recipes ft448 mim224] [--workers 0] [--json benchmarks/results/loader_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETS = {
    "imagenet": [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500)],
    "large": [(1024, 768), (1600, 1200), (1200, 1600), (2048, 1536)],
}
QUALITIES = (75, 90, 96)
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
RECIPES = {  # the official augmentations (configs/eva02/*_in1k.py and *_mim_in21k.py)
    "ft448": dict(img_size=448, scale=(0.08, 1.0), randaug_n=2, reprob=0.0),
    "mim224": dict(img_size=224, scale=(0.2, 1.0), randaug_n=0, reprob=0.0),
}
VARIANTS = ("timm", "timm-u8", "ref", "fast", "fast+reduced", "fast-u8", "fast-u8+norm")
BASE = {"fast-u8": "timm-u8"}  # the variant each is compared with (default: timm)
CLASSES = 4


# ------------------------------------------------------------------------------------ data
def mosaic(side: int = 2304) -> np.ndarray:
    """scikit-image's RGB sample photos tiled at their own resolution (rows of tiles, mirrored to fill)."""
    from skimage import data

    tiles = [getattr(data, n)()[..., :3] for n in SAMPLES]
    canvas = np.zeros((side, side, 3), np.uint8)
    y = x = row_h = k = 0
    while y < side:
        t = tiles[k % len(tiles)][:, :: 1 if (k // len(tiles)) % 2 == 0 else -1]
        h, w = min(t.shape[0], side - y), min(t.shape[1], side - x)
        canvas[y : y + h, x : x + w] = t[:h, :w]
        x, row_h, k = x + w, max(row_h, h), k + 1
        if x >= side:
            x, y, row_h = 0, y + row_h, 0
    return canvas


def make_images(root: Path, sizes: list[tuple[int, int]], n: int, seed: int = 0) -> None:
    """`n` JPEGs of the given sizes and the QUALITIES, cut from the mosaic, in CLASSES class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    canvas = mosaic()
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        zoom = rng.uniform(0.85, 1.15)  # a little resampling, as cameras and ImageNet's resizes leave
        cw, ch = min(int(w / zoom), canvas.shape[1]), min(int(h / zoom), canvas.shape[0])
        y0, x0 = rng.integers(0, canvas.shape[0] - ch + 1), rng.integers(0, canvas.shape[1] - cw + 1)
        img = Image.fromarray(canvas[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.BICUBIC)
        folder = root / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=int(QUALITIES[i % len(QUALITIES)]))


def make_shards(folder: Path, out: Path) -> None:
    from eva02.data.shard_writer import scan_source, write_shards

    write_shards(scan_source(folder), out, shard_size=16 * 2**20, workers=0)


# ------------------------------------------------------------------------------------ loaders
def patch_timm_posterize() -> None:
    """timm 1.0's RandAugment asks PIL to posterize to 0 bits at the top magnitudes ('inc1', mstd), which
    Pillow >= 12 refuses; give it what older Pillow returned (a black image) so that its loader runs."""
    import timm.data.auto_augment as aa
    from PIL import Image, ImageOps

    def posterize(img, bits_to_keep, **_):
        if bits_to_keep >= 8:
            return img
        return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)

    for name, fn in list(aa.NAME_TO_OP.items()):
        if fn is aa.posterize:
            aa.NAME_TO_OP[name] = posterize


def timm_loader(source: str, path: Path, n: int, recipe: dict, batch: int, workers: int):
    import torch
    from timm.data import create_dataset, create_loader

    from eva02.weights.zoo import CLIP_MEAN, CLIP_STD

    if source == "folder":
        ds = create_dataset("", root=str(path), split="", is_training=True)
    else:
        tars = sorted(p.name for p in path.glob("shard-*.tar"))
        split = f"{tars[0]}" if len(tars) == 1 else f"shard-{{{tars[0][6:12]}..{tars[-1][6:12]}}}.tar"
        ds = create_dataset("wds/bench", root=str(path), split=f"{split}|{n}", is_training=True, batch_size=batch)
    s = recipe["img_size"]
    return create_loader(
        ds, input_size=(3, s, s), batch_size=batch, is_training=True, scale=recipe["scale"], ratio=(3 / 4, 4 / 3),
        hflip=0.5, color_jitter=None, auto_augment="rand-m9-mstd0.5-inc1" if recipe["randaug_n"] else None,
        interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD, re_prob=recipe["reprob"], re_mode="pixel",
        num_workers=workers, device=torch.device("cpu"), use_prefetcher=True, persistent_workers=False,
        pin_memory=False,
    )  # fmt: skip


def our_loader(source: str, path: Path, variant: str, recipe: dict, batch: int, seed: int, workers: int):
    from torch.utils.data import DataLoader

    from eva02.data.datasets import TrainSampler, build_dataset, collate
    from eva02.data.fast_transforms import FastTrainTransform
    from eva02.data.shards import shard_dataset
    from eva02.data.train_transforms import seed_worker, train_transform
    from eva02.weights.zoo import CLIP_MEAN, CLIP_STD

    args = dict(img_size=recipe["img_size"], mean=CLIP_MEAN, std=CLIP_STD, scale=recipe["scale"],
                randaug_n=recipe["randaug_n"], reprob=recipe["reprob"])  # fmt: skip
    if variant == "ref":
        tf = train_transform(**args)
    else:
        tf = FastTrainTransform(**args, reduced_decode=variant != "fast", normalize=not variant.startswith("fast-u8"))
    ds = build_dataset(str(path.parent), path.name, "", "", tf) if source == "folder" else shard_dataset(str(path), tf)
    sampler = TrainSampler(len(ds), batch, 0, 1, seed=seed)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                      worker_init_fn=seed_worker if workers else None)  # fmt: skip


def normalizer():
    """The engine's step that normalises uint8 batches where the loop runs (`data.device_normalize`)."""
    from eva02.engine.loader import DeviceNormalize
    from eva02.weights.zoo import CLIP_MEAN, CLIP_STD

    return DeviceNormalize(CLIP_MEAN, CLIP_STD)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # processes ended and waited for: the loader's workers
    return r.ru_utime + r.ru_stime


def run_epoch(loader, post=None) -> tuple[int, float, float]:
    """(images, CPU seconds of this process and its DataLoader workers, wall seconds) of one pass over `loader`,
    each batch given to `post` (a step of the loop, counted too); the workers (not persistent) end with the pass,
    so their CPU time is counted."""
    images, cpu0, wall0 = 0, time.process_time() + children_cpu(), time.perf_counter()
    it = iter(loader)
    for batch in it:
        if post is not None:
            batch = post(batch)
        images += len(batch["images"] if isinstance(batch, dict) else batch[0])
    del it  # shuts the workers down
    return images, time.process_time() + children_cpu() - cpu0, time.perf_counter() - wall0


# ------------------------------------------------------------------------------------ main
def measure(args, paths: dict) -> tuple[list, dict]:
    """Every (set, recipe, source) cell's variants, `args.repeats` times, interleaved, order rotating."""
    import torch

    cells = [(s, r, src) for s in args.sets for r in args.recipes for src in args.sources]
    runs: dict = {(c, v): [] for c in cells for v in args.variants}
    for rep in range(args.repeats):
        for c in cells:
            s, r, src = c
            k = rep % len(args.variants)
            for v in args.variants[k:] + args.variants[:k]:
                torch.manual_seed(rep)  # timm draws from the global generators
                random.seed(rep)
                if v.startswith("timm"):
                    loader = timm_loader(src, paths[s][src], args.images, RECIPES[r], args.batch, args.workers)
                    loader = loader.loader if v == "timm-u8" else loader  # the DataLoader behind the prefetcher
                else:
                    loader = our_loader(src, paths[s][src], v, RECIPES[r], args.batch, rep, args.workers)
                runs[(c, v)].append(run_epoch(loader, normalizer() if v == "fast-u8+norm" else None))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    return cells, runs


def report(cells: list, runs: dict, variants: list[str]) -> list[dict]:
    """Median img/s per core and wall, and the median ratio to the base variant in the same repeat."""
    rows = []
    head = ("set", "recipe", "source", "variant", "img/s/core", "wall img/s", "x base")
    print("\n{:9s} {:7s} {:7s} {:13s} {:>10s} {:>10s} {:>7s}".format(*head))
    for c in cells:
        for v in variants:
            rr, base = runs[(c, v)], runs.get((c, BASE.get(v, "timm")))
            per_core = [n / cpu for n, cpu, _ in rr]
            ratio = None
            if base:
                ratio = statistics.median(
                    n / cpu / (bn / bc) for (n, cpu, _), (bn, bc, _) in zip(rr, base, strict=True)
                )
            row = {"set": c[0], "recipe": c[1], "source": c[2], "variant": v, "images": rr[0][0],
                   "img_s_core": statistics.median(per_core), "img_s_wall": statistics.median(n / w for n, _, w in rr),
                   "x_base": ratio, "base": BASE.get(v, "timm"), "img_s_core_all": per_core}  # fmt: skip
            rows.append(row)
            x = f"{ratio:7.2f}" if ratio is not None else ""
            print(f"{c[0]:9s} {c[1]:7s} {c[2]:7s} {v:13s} {row['img_s_core']:10.1f} {row['img_s_wall']:10.1f} {x}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=192, help="images per set")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--sources", nargs="+", default=["folder", "shards"], choices=["folder", "shards"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (their CPU time is counted)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()

    import PIL
    import timm
    import torch
    import torchvision

    torch.set_num_threads(1)
    patch_timm_posterize()
    results: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
                     "images": args.images, "repeats": args.repeats, "batch": args.batch,
                     "workers": args.workers}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for s in args.sets:
            folder = Path(tmp) / s / "train"
            make_images(folder, SETS[s], args.images)
            make_shards(folder, Path(tmp) / s / "shards")
            paths[s] = {"folder": folder, "shards": Path(tmp) / s / "shards"}
            mb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
            print(f"set {s}: {args.images} JPEGs, {mb:.1f} MB, sizes {SETS[s]}, qualities {QUALITIES}", flush=True)
        cells, runs = measure(args, paths)
    results["rows"] = report(cells, runs, args.variants)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
