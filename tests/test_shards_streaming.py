"""Streamed WebDataset shards (data.streaming): a local folder, a `pipe:cat` pattern and an HTTP server stream
the samples of the indexed reader with its augmentation; the epoch order depends on (seed, epoch) alone;
processes and DataLoader workers read disjoint parts that hold every sample of the epoch once, the same set
for any layout; a resume mid-epoch reads the rest of the uninterrupted sequence; fine-tuning and MIM run on
streams, a resumed streamed fine-tune ends with the uninterrupted one's weights; a shard that cannot be read
is named in one line."""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cli_shard import make_images
from test_engine_digits import config_text, write_digits

from eva02.cli import main
from eva02.data.datasets import BadSample, collate, sample_seed
from eva02.data.shard_stream import ShardStream, StreamError, shard_order, worker_span
from eva02.data.shard_writer import scan_source, write_shards
from eva02.data.shards import Shard, shard_dataset
from eva02.engine.config import ConfigError, RunConfig, load_config, override
from eva02.engine.loader import make_loader


def noisy(img) -> torch.Tensor:
    """A transform that draws from both random streams, as the train transforms do (10 x 12 crop)."""
    return torch.from_numpy(np.asarray(img)[:10].copy()).float() + torch.rand(1) + random.random()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("streaming")


@pytest.fixture(scope="module")
def server(root):
    """The base URL of an HTTP server for `root` (a free port)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):  # curl must reach the local server directly
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def made(root) -> dict:
    src = make_images(root / "src", per_class=10)  # 30 images
    out = root / "img"
    write_shards(scan_source(src), out, shard_size=7000)  # 13 shards of 1 to 3 samples
    n = len(list(out.glob("shard-*.tar")))
    return {"out": out, "pattern": f"shard-{{000000..{n - 1:06d}}}.tar", "indexed": shard_dataset(str(out), noisy)}


def stream(spec: str, buffer: int = 4, transform=noisy) -> ShardStream:
    ds = shard_dataset(spec, transform, stream=True, shuffle_buffer=buffer)
    assert isinstance(ds, ShardStream)
    return ds


def epoch(ds: ShardStream, e: int, seed: int = 3, start: int = 0) -> list:
    """The items one process without workers reads in epoch `e` (global batch 1: every sample)."""
    ds.plan(1, 1, 0, 1, seed)
    ds.set_epoch(e, start)
    return list(ds)


def test_pipe_and_http_stream_the_samples_of_the_indexed_reader(made, server) -> None:
    out, indexed = made["out"], made["indexed"]
    assert len(indexed.shards) > 4 and len({s.count for s in indexed.shards}) > 1  # shards of unequal sizes
    pattern = made["pattern"]
    specs = [str(out), f"pipe:cat {out}/{pattern}", f"{server}/img/manifest.json", f"{server}/img/{pattern}"]
    orders = []
    for spec in specs:
        ds = stream(spec)
        assert len(ds) == len(indexed) == 30 and len(ds.classes) == 3 and ds.labels() == {0, 1, 2}, spec
        items = epoch(ds, 1)
        assert sorted(i for *_, i in items) == list(range(30)), spec  # each sample once
        for x, label, i in items:  # the indexed reader's image, label and augmentation for (seed, epoch, index)
            y, label_y, _ = indexed[(i, sample_seed(3, 1, i))]
            assert label == label_y and torch.equal(x, y), (spec, i)
        orders.append([i for *_, i in items])
    assert all(o == orders[0] for o in orders)  # however the shards are reached
    assert orders[0] != sorted(orders[0])


def test_the_epoch_order_depends_on_seed_and_epoch_alone(made) -> None:
    out = str(made["out"])
    starts = [0]
    for s in made["indexed"].shards:
        starts.append(starts[-1] + s.count)

    def order(seed: int, e: int, buffer: int = 4) -> list[int]:
        return [i for *_, i in epoch(stream(out, buffer, transform=lambda img: 0), e, seed)]

    def shards(o: list[int]) -> list[int]:
        shard = [bisect.bisect_right(starts, i) - 1 for i in o]
        return [s for k, s in enumerate(shard) if k == 0 or shard[k - 1] != s]  # each shard comes whole

    a = order(3, 0)
    assert order(3, 0) == a and order(3, 1) != a and order(4, 0) != a
    assert shards(a) == shard_order(len(starts) - 1, 3, 0)
    assert shards(order(3, 1)) != shards(a) and shards(order(4, 0)) != shards(a)  # the shard order too
    # Inside each shard the buffer's order (seeded by seed, epoch, shard), not the stored one.
    stored = [i for s in shards(a) for i in range(starts[s], starts[s + 1])]
    assert a != stored and order(3, 0, buffer=0) == stored


@pytest.mark.parametrize(("world", "workers", "accum"), [(1, 0, 1), (2, 2, 1), (3, 2, 2), (4, 3, 1)])
def test_every_layout_reads_the_same_samples_of_an_epoch_once(world: int, workers: int, accum: int) -> None:
    counts = [5, 0, 7, 3, 9, 1, 6, 4]  # 35 samples; an empty shard
    ds = ShardStream([Shard(f"s{i}", f"s{i}", c, {}) for i, c in enumerate(counts)], noisy, 4)

    def positions(world: int, workers: int, accum: int, e: int) -> list[tuple[int, int]]:
        got = []
        for rank in range(world):
            ds.plan(2 * world * accum, 2, rank, world, seed=1)
            ds.set_epoch(e)
            for w in range(max(workers, 1)):
                got += [(p.shard, k) for p in ds.pieces(w, workers) for k in range(p.start, p.stop)]
        return got

    for e in (0, 1):
        got = positions(world, workers, accum, e)
        assert len(got) == len(set(got)) == 35 // (2 * world * accum) * (2 * world * accum)
        one = positions(1, 0, 1, e)[: len(got)]  # the epoch stream's first samples: the same set
        assert set(got) == set(one)


def test_worker_turns_continue_where_a_resume_stops() -> None:
    """The loader takes a batch from each worker in turn (skipping finished ones); after `done` trained
    micro-batches the workers' runs give the rest of the uninterrupted order."""

    def loader_order(spans: list[tuple[int, int]]) -> list[int]:
        runs, out = [list(range(a, b)) for a, b in spans], []
        for k in range(max(map(len, runs))):
            out += [r[k] for r in runs if k < len(r)]
        return out

    for batches in range(0, 20):
        for workers in range(0, 6):
            full = loader_order([worker_span(batches, workers, w, 0) for w in range(max(workers, 1))])
            assert sorted(full) == list(range(batches))
            for done in range(batches + 1):
                rest = loader_order([worker_span(batches, workers, w, done) for w in range(max(workers, 1))])
                assert rest == full[done:], (batches, workers, done)


def _batches(ds: ShardStream, workers: int) -> list[tuple[list[int], torch.Tensor]]:
    loader = make_loader(ds, None, override(RunConfig(), {"data.workers": workers}), ds.micro_batch, collate)
    return [(b["index"].tolist(), b["images"]) for b in loader]


def test_two_processes_with_two_workers_read_every_sample_of_the_epoch_once(made) -> None:
    indexed = made["indexed"]
    keys = [indexed.sample(i)["__key__"] for i in range(len(indexed))]
    for e in (0, 1):
        seen = []
        for rank in (0, 1):
            ds = stream(str(made["out"])).plan(4, 2, rank, 2, seed=5)  # 7 steps of 2 x 2: 28 of 30 samples
            ds.set_epoch(e)
            batches = _batches(ds, workers=2)
            assert len(batches) == 7 and all(len(i) == 2 for i, _ in batches)
            for index, images in batches:
                for i, x in zip(index, images, strict=True):
                    seen.append(keys[i])
                    assert torch.equal(x, indexed[(i, sample_seed(5, e, i))][0])
        assert len(seen) == len(set(seen)) == 28
        one = stream(str(made["out"])).plan(4, 4, 0, 1, seed=5)
        one.set_epoch(e)
        assert set(seen) == {keys[i] for *_, i in one}  # the same samples in one process


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_a_resume_mid_epoch_reads_the_rest_of_the_uninterrupted_sequence(made) -> None:
    ds = stream(str(made["out"])).plan(8, 2, 1, 2, seed=7)  # rank 1 of 2, accumulation 2: 3 steps, 6 batches
    for workers in (0, 4):  # 4 workers: runs of 2, 2, 1 and 1 batches
        ds.set_epoch(2)
        full = _batches(ds, workers)
        assert len(full) == 6
        for start in (1, 2):
            ds.set_epoch(2, start)
            rest = _batches(ds, workers)
            assert [i for i, _ in rest] == [i for i, _ in full[2 * start :]], (workers, start)
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, full[2 * start :], strict=True))


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits(root) -> dict:
    data = write_digits(root / "digits", limit=60)  # 48 train, 12 val images
    for split in ("train", "val"):
        write_shards(scan_source(data / split), root / "digit_shards" / split, shard_size=2000)
    cfg = root / "digits.py"
    cfg.write_text(config_text(data, epochs=2, batch=8, global_batch=16, randaug=2, drop_path=0.1, every_steps=2,
                               log_every=1))  # fmt: skip
    return {"data": data, "shards": root / "digit_shards", "cfg": cfg}


def _fit(cfg: RunConfig, wd: Path, resume: str | None = None) -> dict:
    from eva02.engine.train import Trainer

    return Trainer(cfg, wd, resume=resume).fit()


def test_a_fine_tune_streamed_over_http_trains_and_resumes_to_the_same_weights(digits, server, tmp_path) -> None:
    cfg = override(load_config(digits["cfg"]), {
        "data.format": "wds", "data.streaming": True, "data.workers": 2, "data.root": str(digits["shards"]),
        "data.train_shards": f"{server}/digit_shards/train/manifest.json",
    })  # fmt: skip
    assert _fit(cfg, tmp_path / "run")["global_step"] == 6  # 48 images, global batch 16: 3 steps per epoch
    records = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    # From the checkpoint of step 4 (epoch 2, step 1 of 3): the rest of that epoch in the same order.
    _fit(cfg, tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoints" / "step_00000004.pt"))
    wa, wb = load_file(tmp_path / "run" / "final.safetensors"), load_file(tmp_path / "resumed" / "final.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_mim_streams_plain_shards_with_the_indexed_augmentation(digits, root) -> None:
    from eva02.engine.tasks.mim import MimTask

    plain = root / "plain"
    write_shards(scan_source(digits["data"] / "train", labels=False), plain, shard_size=1500)
    base = override(load_config(digits["cfg"]), {
        "train.task": "mim", "model.num_classes": 0, "mim.num_masking": 6, "mim.min_num": 2, "data.val_split": "",
        "data.format": "wds", "data.train_shards": str(plain),
    })  # fmt: skip
    indexed, _ = MimTask().build_datasets(base)
    streamed, _ = MimTask().build_datasets(override(base, {"data.streaming": True}))
    assert isinstance(streamed, ShardStream) and len(streamed) == 48 and streamed.classes == ["image"]
    for (x, mask), _, i in epoch(streamed, 2, seed=0)[:10]:
        (y, mask_y), _, _ = indexed[(i, sample_seed(0, 2, i))]
        assert torch.equal(x, y) and torch.equal(mask, mask_y)


def test_a_stream_defers_jpeg_decoding_as_the_indexed_reader_does(tmp_path) -> None:
    """With the fast train transform, streamed JPEGs reach it undecoded and are decoded at a reduced size where
    the crop allows it: the indexed reader's tensors; a JPEG whose data is corrupt is a bad sample of that name."""
    import io
    import tarfile

    from PIL import Image
    from skimage import data

    from eva02.data.fast_transforms import FastTrainTransform
    from eva02.weights.zoo import CLIP_MEAN, CLIP_STD

    photos = [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")]  # 300 to 640 px
    members = []
    for k, a in enumerate(photos + [photos[1]]):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=88)
        jpg = buf.getvalue()[:6000] if k == 4 else buf.getvalue()  # the last one cut: header fine, data not
        members += [(f"{k:03d}.jpg", jpg), (f"{k:03d}.cls", str(k % 2).encode())]
    with tarfile.open(tmp_path / "photos.tar", "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

    seen: list[tuple[str, int]] = []

    class Spy(FastTrainTransform):
        def plan(self, width: int, height: int):
            p = super().plan(width, height)
            seen.append((kind, p[-1]))
            return p

        def __call__(self, img):
            seen.append((type(img).__name__, 0))
            return super().__call__(img)

    tf = Spy(32, CLIP_MEAN, CLIP_STD, scale=(0.5, 1.0))
    spec = str(tmp_path / "photos.tar")
    indexed = shard_dataset(spec, tf)
    kind = "indexed"
    want = {i: indexed[(i, sample_seed(5, 2, i))] for i in range(5)}
    seen.clear()
    kind = "streamed"
    got = epoch(stream(spec, transform=tf), 2, seed=5)
    assert seen.count(("EncodedImage", 0)) == 5 and ("Image", 0) not in seen  # all five left undecoded
    assert {r for k, r in seen if k == "streamed"} & {2, 4, 8}  # decoded at a reduced size
    assert len(got) == 5
    for item in got:
        if isinstance(item, BadSample):
            assert item == want[4] and item.path.endswith("photos.tar#4") and "truncated" in item.reason, item
            continue
        x, label, i = item
        y, label_y, _ = want[i]
        assert label == label_y and torch.equal(x, y), i
    assert sum(isinstance(item, BadSample) for item in got) == 1


# ------------------------------------------------------------------------------------------ errors
def test_a_shard_that_cannot_be_read_is_named_in_one_line(made, digits, server, root, capsys) -> None:
    data = ["--set", "data.format=wds", "data.streaming=true", f"data.root={digits['shards']}"]
    # A pattern of URLs without a manifest is counted at start: a missing shard stops the run there.
    missing = f"{server}/digit_shards/train/nope-{{0..1}}.tar"
    rc = main(["train", str(digits["cfg"]), "--work-dir", str(root / "bad1"), *data, f"data.train_shards={missing}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"{server}/digit_shards/train/nope-0.tar" in err and "HTTP error" in err
    # A manifest naming a missing shard: a DataLoader worker meets it, and the message is still one line.
    broken = root / "broken"
    broken.mkdir()
    m = json.loads((digits["shards"] / "train" / "manifest.json").read_text())
    for e in m["shardlist"]:
        e["url"] = f"{server}/digit_shards/train/{e['url']}"
    m["shardlist"][1]["url"] = f"{server}/broken/gone.tar"
    (broken / "manifest.json").write_text(json.dumps(m))
    rc = main(["train", str(digits["cfg"]), "--work-dir", str(root / "bad2"), *data, "data.workers=2",
               f"data.train_shards={broken / 'manifest.json'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"cannot read shard {server}/broken/gone.tar" in err, err
    # A failing command, and a shard with fewer samples than its manifest says.
    with pytest.raises(StreamError, match=r"cannot read shard pipe:exit 3: the command exited with status 3"):
        stream("pipe:exit 3")
    m = json.loads((made["out"] / "manifest.json").read_text())
    m["shardlist"] = [{**m["shardlist"][0], "nsamples": m["shardlist"][0]["nsamples"] + 1}]
    shutil.copy(made["out"] / m["shardlist"][0]["url"], broken)
    (broken / "short.json").write_text(json.dumps(m))
    with pytest.raises(StreamError, match=r"shard .*shard-000000.tar holds \d+ samples, \d+ expected"):
        epoch(stream(str(broken / "short.json")), 0)


def test_config_checks_the_streaming_fields() -> None:
    with pytest.raises(ConfigError, match=r"data.streaming=True: expects False for data.format='folder'"):
        override(RunConfig(), {"data.streaming": "true"})
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer=-1: expects int >= 0"):
        override(RunConfig(), {"data.format": "wds", "data.shuffle_buffer": "-1"})
    assert override(RunConfig(), {"data.format": "wds", "data.streaming": "true"}).data.streaming is True


@pytest.mark.slow
def test_two_streaming_processes_killed_then_resumed_end_with_the_uninterrupted_weights(digits, server, tmp_path):
    """torchrun with 2 ranks and 2 DataLoader workers each streams the shards over HTTP; SIGKILL after the
    checkpoint of step 4 (mid-epoch); resumed with 2 ranks, the run ends with the uninterrupted run's
    weights, bit for bit (drop path and RandAugment on)."""
    import socket
    import subprocess
    import sys
    import time

    from test_data_shards import sigkill_tree

    cfg = tmp_path / "cfg.py"
    cfg.write_text(config_text(digits["data"], epochs=3, batch=4, global_batch=16, randaug=2, drop_path=0.1,
                               every_steps=1, log_every=1))  # fmt: skip
    data = ["--set", "data.format=wds", "data.streaming=true", f"data.root={digits['shards']}", "data.workers=2",
            f"data.train_shards={server}/digit_shards/train/manifest.json"]  # fmt: skip
    train_py = str(Path(__file__).resolve().parents[1] / "tools/train.py")

    def torchrun(work: Path, *extra: str) -> subprocess.Popen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", train_py,
               str(cfg), "--work-dir", str(work), *data, *extra]  # fmt: skip
        with open(f"{work}.log", "a") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    one, killed = tmp_path / "one", tmp_path / "killed"
    assert torchrun(one).wait(timeout=600) == 0, Path(f"{one}.log").read_text()[-2000:]
    proc = torchrun(killed)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000004.pt").exists() and proc.poll() is None:
        assert time.time() < deadline, Path(f"{killed}.log").read_text()[-2000:]
        time.sleep(0.01)
    sigkill_tree(proc, deadline)  # the ranks, their DataLoader workers and the workers' curl processes
    assert not (killed / "final.safetensors").exists(), "the run ended before it was killed"
    assert torchrun(killed, "--resume", "auto").wait(timeout=600) == 0, Path(f"{killed}.log").read_text()[-2000:]
    w1, w2 = load_file(one / "final.safetensors"), load_file(killed / "final.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
