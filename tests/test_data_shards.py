"""Training from WebDataset shards (data.format='wds'): sample i of the shards is image i of the folders they
were made from, pixel for pixel; every way of naming shards (folder, manifest, brace pattern, file:// and
pipe: URLs through the cache) reads the same samples; ranks read disjoint parts that cover the epoch; a
fine-tune on shards ends with the weights of the same fine-tune on folders, also when resumed from a
checkpoint of the folder run; MIM reads plain-folder shards as it reads the folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cli_shard import make_images
from test_engine_digits import config_text, write_digits
from torch.utils.data import DataLoader

from eva02.data.datasets import BadSample, TrainSampler, build_dataset, collate, sample_seed
from eva02.data.shard_writer import scan_source, write_shards
from eva02.data.shards import shard_dataset
from eva02.engine.config import ConfigError, RunConfig, load_config, override


def pixels(img) -> np.ndarray:
    return np.asarray(img)


def noisy(img) -> torch.Tensor:
    """A transform that draws from both random streams, as the train transforms do (10 x 12 crop)."""
    return torch.from_numpy(np.asarray(img)[:10].copy()).float() + torch.rand(1) + random.random()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("shards")
    src = make_images(tmp / "src", per_class=5)
    write_shards(scan_source(src), tmp / "out", shard_size=3000)
    return {"tmp": tmp, "src": src, "out": tmp / "out"}


def test_shards_read_as_the_folders_they_were_made_from(made) -> None:
    ds = shard_dataset(str(made["out"]), pixels)
    folders = build_dataset(str(made["src"]), "", "", "", pixels)
    assert len(ds) == len(folders) == 15 and ds.classes == folders.classes == ["cat", "dog", "emu"]
    assert len(ds.shards) > 2
    for i in range(len(ds)):
        (a, la, ia), (b, lb, ib) = ds[i], folders[i]
        assert (la, ia) == (lb, ib) and np.array_equal(a, b), i
    # Seeded keys: the same augmentation as the folder dataset draws for that (index, seed).
    ds.transform = folders.transform = noisy
    for i in (0, 7, 14):
        key = (i, sample_seed(3, 1, i))
        assert torch.equal(ds[key][0], folders[key][0])
    ds.check(3, "train")
    with pytest.raises(ValueError, match=r"label 2 outside \[0, 2\)"):
        ds.check(2, "train")


def test_every_way_of_naming_shards_reads_the_same_samples(made) -> None:
    out = made["out"]
    names = sorted(p.name for p in out.glob("shard-*.tar"))
    first, last = names[0][6:12], names[-1][6:12]
    cache = made["tmp"] / "cache"
    specs = [
        str(out / "manifest.json"),
        str(out / f"shard-{{{first}..{last}}}.tar"),
        "::".join(str(out / n) for n in names),
        f"file://{out}/shard-{{{first}..{last}}}.tar",
        f"pipe:cat {out}/shard-{{{first}..{last}}}.tar",
    ]
    want = shard_dataset(str(out), pixels)
    keys = [want.sample(i)["__key__"] for i in range(len(want))]
    for spec in specs:
        ds = shard_dataset(spec, pixels, cache_dir=str(cache))
        assert [ds.sample(i)["__key__"] for i in range(len(ds))] == keys, spec
        assert ds.labels() == {0, 1, 2} and len(ds.classes) == 3, spec
    assert len(list(cache.glob("*.tar"))) == 2 * len(names)  # file:// and pipe: copies, whole
    assert not list(cache.glob(".*.part"))


def test_bad_shard_specs_and_samples_are_named(made, tmp_path: Path) -> None:
    (tmp_path / "loose").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        shard_dataset(str(tmp_path / "loose"), pixels)
    with pytest.raises(FileNotFoundError, match="shard .*nope-1.tar does not exist"):
        shard_dataset(str(tmp_path / "nope-{1..2}.tar"), pixels)
    # A URL whose bytes differ from the manifest's sha256 is not cached.
    m = json.loads((made["out"] / "manifest.json").read_text())
    m["shardlist"] = m["shardlist"][:1]
    m["shardlist"][0]["url"] = f"file://{made['out']}/shard-000001.tar"
    (tmp_path / "m.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="sha256 .* differs from the manifest's"):
        shard_dataset(str(tmp_path / "m.json"), pixels, cache_dir=str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("*.tar"))
    # An undecodable image inside a shard comes back as a BadSample naming the shard and key.
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        w.write({"__key__": "a", "jpg": b"not a jpeg", "cls": 0})
    (item,) = [shard_dataset(str(tmp_path / "bad.tar"), pixels)[0]]
    assert isinstance(item, BadSample) and item.path.endswith("bad.tar#0") and "bad.tar#0 (a)" in item.reason
    assert collate([item])["bad"] == [(item.path, item.reason)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_read_disjoint_parts_that_cover_the_epoch(made, world: int) -> None:
    ds = shard_dataset(str(made["out"]), pixels)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            sampler = TrainSampler(len(ds), 4, rank, world, seed=5)
            sampler.set_epoch(epoch)
            per_rank.append([ds.sample(i)["__key__"] for i, _ in sampler])
        keys = [k for r in per_rank for k in r]
        assert len(keys) == len(set(keys)) == 12  # 3 whole global batches of 4, no key twice
        one = TrainSampler(len(ds), 4, 0, 1, seed=5)
        one.set_epoch(epoch)
        assert set(keys) == {ds.sample(i)["__key__"] for i, _ in one}  # the same samples for any world size


def test_worker_processes_read_what_the_main_process_reads(made) -> None:
    ds = shard_dataset(str(made["out"]), noisy)
    ds[0]  # open tars in this process: workers must open their own
    sampler = TrainSampler(len(ds), 5, 0, 1, seed=1)

    def batches(workers: int) -> list[dict]:
        return list(DataLoader(ds, batch_size=5, sampler=sampler, num_workers=workers, collate_fn=collate))

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("digits")
    root = write_digits(tmp / "digits", limit=60)  # 48 train, 12 val images
    for split in ("train", "val"):
        write_shards(scan_source(root / split), tmp / "shards" / split, shard_size=700)
    (tmp / "cfg.py").write_text(config_text(root, epochs=2, batch=8, global_batch=16, randaug=2, drop_path=0.1,
                                            every_steps=2, log_every=1))  # fmt: skip
    return {"tmp": tmp, "root": root, "shards": tmp / "shards", "cfg": tmp / "cfg.py"}


def _fit(cfg: RunConfig, wd: Path, resume: str | None = None) -> dict:
    from eva02.engine.train import Trainer

    return Trainer(cfg, wd, resume=resume).fit()


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fine_tune_on_shards_ends_with_the_weights_of_the_folder_run(digits) -> None:
    base = load_config(digits["cfg"])
    wds_cfg = override(base, {"data.format": "wds", "data.root": str(digits["shards"])})
    assert len(list((digits["shards"] / "train").glob("*.tar"))) > 3
    folder = _fit(base, digits["tmp"] / "folder")
    shards = _fit(wds_cfg, digits["tmp"] / "wds")
    assert folder["global_step"] == shards["global_step"] == 6
    assert folder["top1"] == shards["top1"]
    _same_weights(digits["tmp"] / "folder", digits["tmp"] / "wds")
    # A checkpoint of the folder run, resumed on the shards, ends with the same weights too.
    ckpt = digits["tmp"] / "folder" / "checkpoints" / "step_00000004.pt"
    _fit(wds_cfg, digits["tmp"] / "resumed", resume=str(ckpt))
    _same_weights(digits["tmp"] / "folder", digits["tmp"] / "resumed")


def test_mim_reads_plain_folder_shards_as_the_folder(digits, tmp_path: Path) -> None:
    from eva02.engine.tasks.mim import MimTask

    plain = tmp_path / "plain"
    write_shards(scan_source(digits["root"] / "train", labels=False), plain, shard_size=900)
    base = override(load_config(digits["cfg"]), {"train.task": "mim", "model.num_classes": 0, "mim.num_masking": 6,
                                                 "mim.min_num": 2, "data.val_split": ""})  # fmt: skip
    folder, _ = MimTask().build_datasets(base)
    shards, _ = MimTask().build_datasets(override(base, {"data.format": "wds", "data.train_shards": str(plain)}))
    assert len(folder) == len(shards) == 48 and shards.classes == ["image"]
    with pytest.raises(ValueError, match="has no labels"):  # such shards are no classification data
        shards.check(10, "train")
    for i in (0, 20, 47):
        key = (i, sample_seed(0, 2, i))
        (xa, ma), _, _ = folder[key]
        (xb, mb), _, _ = shards[key]
        assert torch.equal(xa, xb) and torch.equal(ma, mb)


def test_config_names_the_formats() -> None:
    with pytest.raises(ConfigError, match=r"data.format='tar': expects one of 'folder', 'list', 'wds'"):
        override(RunConfig(), {"data.format": "tar"})
    with pytest.raises(ConfigError, match=r"data.format='wds': expects 'folder' for train.task='segment'"):
        override(RunConfig(), {"data.format": "wds", "train.task": "segment", "data.batch_size": 2})


def test_list_format_needs_a_list_file(digits) -> None:
    from eva02.engine.tasks.classify import ClassificationTask

    cfg = override(load_config(digits["cfg"]), {"data.format": "list"})
    with pytest.raises(FileNotFoundError, match="data.format='list' needs a list file: set data.train_list"):
        ClassificationTask().build_datasets(cfg)


@pytest.mark.slow
def test_two_processes_on_shards_killed_then_resumed_in_one_process(digits, tmp_path: Path) -> None:
    """torchrun with 2 ranks and 2 DataLoader workers each reads the shards; SIGKILL after step 3; the
    resume in 1 process ends where the uninterrupted 1-process run ends (float tolerance: no drop path,
    no mixup, whose seeds are per process)."""
    import socket
    import subprocess
    import sys
    import time

    from eva02.cli import main

    cfg = tmp_path / "cfg.py"
    cfg.write_text(config_text(digits["root"], epochs=4, batch=4, global_batch=16, randaug=2, drop_path=0.0,
                               every_steps=1, log_every=1))  # fmt: skip
    data = ["--set", "data.format=wds", f"data.root={digits['shards']}", "data.workers=2"]
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "one"), *data]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    killed = tmp_path / "killed"
    train_py = str(Path(__file__).resolve().parents[1] / "tools/train.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", train_py,
           str(cfg), "--work-dir", str(killed), *data]  # fmt: skip
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000003.pt").exists() and proc.poll() is None:
        assert time.time() < deadline, (tmp_path / "killed.log").read_text()[-2000:]
        time.sleep(0.01)
    sigkill_tree(proc, deadline)  # the ranks and their DataLoader workers
    assert not (killed / "final.safetensors").exists(), "the run ended before it was killed"
    assert main(["train", str(cfg), "--work-dir", str(killed), "--resume", "auto", *data]) == 0
    w1, w2 = load_file(tmp_path / "one" / "final.safetensors"), load_file(killed / "final.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)


def sigkill_tree(proc, deadline: float) -> None:
    """SIGKILL `proc` and every process below it at once (no process left to clean up after the others),
    then wait until none of them runs any more (before `deadline`, a time.time() value)."""
    import contextlib
    import os
    import signal
    import time

    tree = _descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in tree):
        assert time.time() < deadline, "processes of the killed run stay alive"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out
