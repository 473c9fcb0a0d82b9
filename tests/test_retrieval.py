"""eva02.retrieval: the index file, building (parts, resume, update, model identity), exact and faiss search.

The model is the tiny random `CLIP_VARIANTS["test"]`; images are generated noise pictures, distinct enough
that each one's nearest neighbour is itself.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eva02 import retrieval as R
from eva02.fileio import DirLock, LockedError, temp_path
from eva02.model.clip import CLIP_VARIANTS, Eva02Clip


def tiny_clip(seed: int) -> Eva02Clip:
    torch.manual_seed(seed)
    return Eva02Clip(CLIP_VARIANTS["test"]).eval()


@pytest.fixture(scope="module")
def clip() -> Eva02Clip:
    return tiny_clip(0)


def make_images(folder, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        rel = f"{'sub/' if i % 3 == 0 else ''}{i:03d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48 + i % 5, 60, 3), dtype=np.uint8)).save(folder / rel)
        names.append(rel)
    return sorted(names)


def build(folder, clip, out, **kw) -> R.BuildReport:
    return R.build_index(folder, clip, out, batch_size=4, progress=False, log=lambda m: None, **kw)


def test_streamed_safetensors_read_back(tmp_path) -> None:
    emb = torch.randn(10, 6).half()
    tensors = [("embeddings", torch.float16, (10, 6), [emb[:3], emb[3:]]), *R._row_tensors([])]
    R._write_safetensors(str(tmp_path / "x.safetensors"), tensors, {"k": "v"})
    back = load_file(tmp_path / "x.safetensors")
    assert torch.equal(back["embeddings"], emb) and back["paths"].numel() == back["sizes"].numel() == 0
    with pytest.raises(RuntimeError, match="expected"):
        R._write_safetensors(str(tmp_path / "y.safetensors"), [("e", torch.float16, (10, 6), [emb[:3]])], {})


def test_build_then_each_image_finds_itself(tmp_path, clip) -> None:
    names = make_images(tmp_path / "imgs", 10)
    report = build(tmp_path / "imgs", clip, tmp_path / "i.safetensors", save_every=3)
    index = report.index
    assert (report.total, report.embedded, report.reused, report.written) == (10, 10, 0, True)
    assert index.paths == names and index.dim == 64 and len(index) == 10
    assert not R.parts_dir(tmp_path / "i.safetensors").exists()  # merged, then removed
    files = [index.file(i) for i in range(10)]
    direct = R.embed_images(clip, files)
    stored = torch.cat([e for _, e in index.chunks(rows=4)])
    torch.testing.assert_close(stored, direct, atol=2e-3, rtol=0)  # fp16 storage
    for i, hits in enumerate(index.search(direct, topk=3)):
        assert hits[0].row == i and hits[0].path == names[i] and hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert hits[0].score > hits[1].score >= hits[2].score
    assert index.model["config"] == json.loads(json.dumps(clip.cfg.to_dict()))


def test_an_interrupted_build_continues_to_the_same_index(tmp_path, clip, monkeypatch) -> None:
    make_images(tmp_path / "imgs", 11)
    full = build(tmp_path / "imgs", clip, tmp_path / "full.safetensors").index
    write, calls = R._Parts.write, []

    def killed_after_two_parts(self, emb, rows):
        calls.append(len(rows))
        if len(calls) > 2:  # every later write fails too, as after a SIGKILL: no last-moment save
            raise KeyboardInterrupt
        write(self, emb, rows)

    monkeypatch.setattr(R._Parts, "write", killed_after_two_parts)
    out = tmp_path / "i.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "imgs", clip, out, save_every=4)
    monkeypatch.setattr(R._Parts, "write", write)
    assert not out.exists() and len(list(R.parts_dir(out).glob("part-*.safetensors"))) == 2
    notes: list[str] = []
    report = R.build_index(tmp_path / "imgs", clip, out, batch_size=4, save_every=4, progress=False, log=notes.append)
    assert (report.reused, report.embedded) == (8, 3) and "8 of 11 images are done" in notes[0]
    assert report.index.paths == full.paths
    torch.testing.assert_close(report.index.take(np.arange(11)), full.take(np.arange(11)), atol=1e-3, rtol=0)


def test_damaged_parts_and_dead_writers_leftovers_are_passed_over(tmp_path, clip) -> None:
    make_images(tmp_path / "imgs", 6)
    out = tmp_path / "i.safetensors"
    build(tmp_path / "imgs", clip, out, save_every=2)
    parts = R.parts_dir(out)
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"format": R.PART_FORMAT, "model": R.model_info(clip)}))
    (parts / "part-000001.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    stale = temp_path(parts / "part-000002.safetensors").with_name(
        temp_path(parts / "part-000002.safetensors").name.replace(f".{os.getpid()}.", ".999999999.")
    )
    stale.write_bytes(b"half")
    notes: list[str] = []
    report = R.build_index(tmp_path / "imgs", clip, out, force=True, progress=False, log=notes.append)
    assert report.embedded == 6 and any("cannot be read" in n for n in notes)
    assert not parts.exists()


def test_update_adds_new_and_changed_images_and_drops_vanished(tmp_path, clip) -> None:
    folder = tmp_path / "imgs"
    make_images(folder, 5)
    out = tmp_path / "i.safetensors"
    first = build(folder, clip, out).index
    with pytest.raises(ValueError, match="already exists"):
        build(folder, clip, out)
    again = build(folder, clip, out, update=True)
    assert not again.written and again.index.index_id == first.index_id  # nothing to do: file untouched
    Image.new("RGB", (50, 50), (200, 10, 10)).save(folder / "new.png")
    Image.new("RGB", (50, 50), (10, 10, 200)).save(folder / "001.png")  # changed content, size and mtime
    (folder / "002.png").unlink()
    report = build(folder, clip, out, update=True)
    assert (report.embedded, report.reused) == (2, 3)
    index = report.index
    assert sorted(index.paths) == sorted(["sub/000.png", "001.png", "sub/003.png", "004.png", "new.png"])
    row = index.paths.index("001.png")
    assert index.search(R.embed_images(clip, [folder / "001.png"]), topk=1)[0][0].row == row


def test_another_model_never_joins(tmp_path, clip, monkeypatch) -> None:
    folder = tmp_path / "imgs"
    make_images(folder, 4)
    out = tmp_path / "i.safetensors"
    other = tiny_clip(1)  # same config, other weights: told apart by the probe embedding
    build(folder, clip, out)
    with pytest.raises(R.IndexMismatch, match="never mixed"):
        build(folder, other, out, update=True)

    def killed(self, emb, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(R._Parts, "write", killed)
    out2 = tmp_path / "j.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build(folder, clip, out2, save_every=2)
    monkeypatch.undo()
    assert (R.parts_dir(out2) / "manifest.json").is_file()
    with pytest.raises(R.IndexMismatch, match="unfinished|holds embeddings"):
        build(folder, other, out2)
    report = build(folder, other, out2, force=True)  # the unfinished build of the other model is discarded
    assert report.embedded == 4 and R.check_same_model(report.index.model, R.model_info(other), "x", "") is None


def test_a_build_in_progress_is_locked(tmp_path, clip) -> None:
    make_images(tmp_path / "imgs", 2)
    out = tmp_path / "i.safetensors"
    with DirLock(R.parts_dir(out)), pytest.raises(LockedError, match="in use by another build"):
        build(tmp_path / "imgs", clip, out)


def synthetic(tmp_path, n: int, dim: int, seed: int = 0) -> R.ImageIndex:
    rng = np.random.default_rng(seed)
    emb = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
    rows = [R.FileRow(f"{i:05d}.jpg", 1, 1) for i in range(n)]
    return R.write_index(tmp_path / "syn.safetensors", emb, rows, tmp_path, {"name": "synthetic"})


def test_chunked_exact_search_equals_one_matrix_product(tmp_path) -> None:
    index = synthetic(tmp_path, 1000, 32)
    q = torch.randn(5, 32)
    hits = index.search(q, topk=7, chunk_rows=37)
    emb = index.take(np.arange(1000))
    ref = (torch.nn.functional.normalize(q, dim=-1) @ emb.T).topk(7, dim=1)
    assert [[h.row for h in row] for row in hits] == ref.indices.tolist()
    torch.testing.assert_close(torch.tensor([[h.score for h in row] for row in hits]), ref.values)
    assert len(index.search(q, topk=5000)[0]) == 1000


def test_ann_agrees_with_exact_search_on_easy_data(tmp_path) -> None:
    pytest.importorskip("faiss")
    index = synthetic(tmp_path, 3000, 32)
    rows = np.arange(0, 3000, 37)
    queries = index.take(rows) + 0.05 * torch.randn(len(rows), 32)  # near copies of stored rows
    ann = R.build_ann(index)
    assert R._faiss().extract_index_ivf(ann).nlist > 1  # a real IVF index at this size
    R.save_ann(index, ann)
    loaded = R.load_ann(index)
    exact, approx = index.search(queries, topk=5), index.search(queries, topk=5, ann=loaded)
    assert [h[0].row for h in exact] == [h[0].row for h in approx] == rows.tolist()
    overlap = np.mean([len({h.row for h in a} & {h.row for h in b}) / 5 for a, b in zip(exact, approx, strict=True)])
    assert overlap >= 0.9
    for a, b in zip(exact, approx, strict=True):
        assert a[0].score == pytest.approx(b[0].score, abs=2e-3)
    rewritten = synthetic(tmp_path, 3000, 32)  # a new version of the index: the saved faiss index is stale
    with pytest.raises(ValueError, match="earlier version"):
        R.load_ann(rewritten)


def test_a_record_from_before_a_config_field_was_added_still_matches(clip) -> None:
    """An index written before Eva02Config grew a field (its record lacks it) matches the same model;
    a field of another value does not."""
    from dataclasses import MISSING, fields

    info = R.model_info(clip)
    cfg = clip.cfg.vision
    name = next(f.name for f in fields(cfg) if f.default is not MISSING and getattr(cfg, f.name) == f.default)
    older = json.loads(json.dumps(info))
    del older["config"]["vision"][name]
    R.check_same_model(older, info, "old.safetensors", "")
    other = json.loads(json.dumps(info))
    other["config"]["vision"]["depth"] += 1
    with pytest.raises(R.IndexMismatch, match="other config") as e:
        R.check_same_model(other, info, "old.safetensors", "")
    assert e.value.why == "config"
