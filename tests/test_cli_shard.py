"""`eva02 shard`: class folders, list files and plain folders -> WebDataset tars with a manifest (counts,
sha256, class names, unreadable images left out and named), the same bytes for the same input, outputs
checked before work and never half-written; `eva02 shard --verify` re-reads and reports in one line."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eva02.cli import main
from eva02.data import shard_writer


def make_images(root: Path, classes=("cat", "dog", "emu"), per_class: int = 4, seed: int = 0) -> Path:
    """Small random images in class folders, as PNG, JPEG, BMP (re-encoded on sharding) and CMYK JPEG."""
    rng = np.random.default_rng(seed)
    kinds = ("png", "jpg", "bmp", "cmyk.jpg")
    for c in classes:
        for i in range(per_class):
            path = root / c / f"{i}.{kinds[i % len(kinds)]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8))
            (img.convert("CMYK") if kinds[i % len(kinds)] == "cmyk.jpg" else img).save(path)
    return root


def members(tar: Path) -> list[str]:
    with tarfile.open(tar) as t:
        return t.getnames()


def test_class_folders_to_shards_then_verify(tmp_path: Path, capsys) -> None:
    src = make_images(tmp_path / "src")
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "out"
    assert main(["shard", str(src), str(out), "--shard-size", "2KB", "--workers", "0"]) == 0
    cap = capsys.readouterr()
    assert "broken.png" in cap.err and "left out" in cap.err
    assert f"to {out}: 12 images in 3 classes" in cap.out and "1 unreadable image left out" in cap.out
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["cat", "dog", "emu"] and m["count"] == 12 and m["kind"] == "folders"
    assert [s["path"] for s in m["skipped"]] == [str(src / "dog" / "broken.png")]
    assert len(m["shardlist"]) > 1 and sum(e["nsamples"] for e in m["shardlist"]) == 12
    per_class: Counter = Counter()
    for e in m["shardlist"]:
        per_class.update({int(k): v for k, v in e["class_counts"].items()})
    assert per_class == {0: 4, 1: 4, 2: 4}
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(e["url"] for e in m["shardlist"])])
    for e in m["shardlist"]:
        assert hashlib.sha256((out / e["url"]).read_bytes()).hexdigest() == e["sha256"]
        assert (out / e["url"]).stat().st_size == e["filesize"]
    names = [n for e in m["shardlist"] for n in members(out / e["url"])]
    assert names[:3] == ["000000000.cls", "000000000.json", "000000000.png"]
    assert {n.split(".", 1)[1] for n in names} == {"cls", "png", "jpg", "json"}  # BMP became PNG
    with tarfile.open(out / m["shardlist"][0]["url"]) as t:
        meta = json.loads(t.extractfile("000000000.json").read())
        original = (src / "cat" / "0.png").read_bytes()
        assert t.extractfile("000000000.png").read() == original  # PNG and JPEG files stored as they are
    assert meta == {"path": "cat/0.png", "index": 0, "class": "cat"}

    assert main(["shard", "--verify", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{out}: {len(m['shardlist'])} shards, 12 images in 3 classes; sizes, sha256, counts and images " \
                   "all match the manifest"  # fmt: skip
    # One flipped byte inside an image: the checksum and the image's decoding both tell.
    first = out / m["shardlist"][0]["url"]
    data = bytearray(first.read_bytes())
    data[512 * 5 + 100] ^= 0xFF  # inside the first sample's PNG (after the cls and json members)
    first.write_bytes(bytes(data))
    assert main(["shard", "--verify", str(out), "--workers", "2"]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: ") and "shard-000000.tar: sha256 differs" in line and "\n" not in line


def test_same_input_gives_the_same_bytes_with_any_worker_count(tmp_path: Path, capsys) -> None:
    src = make_images(tmp_path / "src", per_class=3)
    assert main(["shard", str(src), str(tmp_path / "a"), "--shard-size", "4KB", "--workers", "0"]) == 0
    assert main(["shard", str(src), "-o", str(tmp_path / "b"), "--shard-size", "4KB", "--workers", "2"]) == 0
    a, b = (json.loads((tmp_path / x / "manifest.json").read_text()) for x in "ab")
    assert [e["sha256"] for e in a["shardlist"]] == [e["sha256"] for e in b["shardlist"]]
    # --shard-size is the size of the tar file: each shard but the last reaches it, and passes it by at
    # most one sample and tar's closing record (10 KiB).
    assert main(["shard", str(src), str(tmp_path / "c"), "--shard-size", "12KB"]) == 0
    sizes = [e["filesize"] for e in json.loads((tmp_path / "c" / "manifest.json").read_text())["shardlist"]]
    assert len(sizes) > 1 and all(12_000 <= n <= 12_000 + 4096 + 10240 for n in sizes[:-1]), sizes


def test_outputs_are_checked_before_work_and_replaced_only_with_force(tmp_path: Path, capsys) -> None:
    src = make_images(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    assert main(["shard", str(src), str(out), "--shard-size", "1KB"]) == 0
    many = sorted(p.name for p in out.iterdir())
    assert len(many) > 3
    capsys.readouterr()
    assert main(["shard", str(src), str(out)]) == 2
    assert "already holds shards; pass --force" in capsys.readouterr().err
    assert main(["shard", str(src), str(src / "shards")]) == 2
    assert "is inside the source" in capsys.readouterr().err
    assert not (src / "shards").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["shard", str(src), str(tmp_path / "other")]) == 2
    assert "not shards of `eva02 shard` (notes.txt)" in capsys.readouterr().err
    assert main(["shard", str(src), str(tmp_path / "x"), "--shard-size", "lots"]) == 2
    assert "is not a size like 1GB" in capsys.readouterr().err
    # --force: one big shard replaces the many small ones, which are removed.
    assert main(["shard", str(src), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]


def test_a_failed_run_leaves_no_shard_behind(tmp_path: Path, monkeypatch) -> None:
    src = make_images(tmp_path / "src", per_class=4)
    calls = []

    def failing(path: str):
        calls.append(path)
        if len(calls) == 7:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of a run
        return real(path)

    real = shard_writer.encode_file
    monkeypatch.setattr(shard_writer, "encode_file", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_shards(shard_writer.scan_source(src), out, shard_size=1000)
    assert out.is_dir() and list(out.iterdir()) == []  # neither shards nor their temporaries


def test_list_file_and_plain_folder(tmp_path: Path, capsys) -> None:
    src = make_images(tmp_path / "src", classes=("a", "b"), per_class=2)
    (tmp_path / "train.txt").write_text("b/1.jpg 1\na/0.png 0\n")
    (tmp_path / "names.txt").write_text("apple\nbanana\n")
    out = tmp_path / "list"
    argv = ["shard", str(src), str(out), "--list", str(tmp_path / "train.txt"), "--class-names"]
    assert main([*argv, str(tmp_path / "names.txt")]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "list" and m["classes"] == ["apple", "banana"] and m["count"] == 2
    with tarfile.open(out / "shard-000000.tar") as t:
        assert json.loads(t.extractfile("000000000.json").read()) == {"path": "b/1.jpg", "index": 0, "class": "banana"}
        assert t.extractfile("000000000.cls").read() == b"1"
    plain = tmp_path / "plain"
    assert main(["shard", str(src), str(plain), "--no-labels"]) == 0
    m = json.loads((plain / "manifest.json").read_text())
    assert m["kind"] == "plain" and m["classes"] == [] and m["count"] == 4
    assert not any(n.endswith(".cls") for n in members(plain / "shard-000000.tar"))
    assert "4 images (no labels)" in capsys.readouterr().out
    assert main(["shard", "--verify", str(plain)]) == 0
    assert "4 images; sizes, sha256" in capsys.readouterr().out


def test_size_words() -> None:
    assert shard_writer.parse_size("1GB") == 10**9
    assert shard_writer.parse_size("2GiB") == 2 * 2**30
    assert shard_writer.parse_size("500 mb") == 5 * 10**8
    assert shard_writer.parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        shard_writer.parse_size("0")


def test_without_the_data_extra_one_line_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    src = make_images(tmp_path / "src", per_class=1)
    monkeypatch.setitem(sys.modules, "webdataset", None)  # as if it were not installed
    assert main(["shard", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eva02 shard needs webdataset, wids and datasets" in err[0] and "eva02[data]" in err[0]
    assert not (tmp_path / "out").exists()
