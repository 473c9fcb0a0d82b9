"""What the commands that write files promise about their outputs: never onto an input (same path,
symlink or hard link), never over an existing file without --force, a bad output path refused in one
line before any work, files with the umask's permissions, and a quiet end when stdout's reader leaves."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from eva02.cli import main
from eva02.model.config import VARIANTS
from eva02.model.vit import Eva02

load = pytest.importorskip("eva02.weights.load")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved random classifier and a folder of two photos."""
    root = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    load.save_checkpoint(Eva02(VARIANTS["test"].replace(num_classes=10)), root / "m.safetensors")
    imgs = root / "imgs"
    imgs.mkdir()
    Image.fromarray(data.chelsea()).save(imgs / "cat.png")
    Image.fromarray(data.coffee()).save(imgs / "coffee.jpg", quality=90)
    return root, imgs


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str, command: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"eva02 {command}: error: "), err
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in err


def make_alias(target: Path, alias: Path, kind: str) -> Path:
    """`target` itself, or a symlink or hard link to it at `alias`."""
    if kind == "same":
        return target
    if kind == "symlink":
        alias.symlink_to(target)
    else:
        os.link(target, alias)
    return alias


# ----------------------------------------------------------------------------- never onto an input
@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("command", ["export", "features", "convert", "mask-demo"])
def test_an_input_is_never_the_output(files, capsys, tmp_path, command, kind):
    root, imgs = files
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes((root / "m.safetensors").read_bytes())
    photo = tmp_path / "photo.png"
    photo.write_bytes((imgs / "cat.png").read_bytes())
    target = photo if command == "mask-demo" else ckpt
    before = target.read_bytes()
    out = make_alias(target, tmp_path / f"alias{target.suffix}", kind)
    argv = {
        "export": ["export", "--checkpoint", ckpt, "--format", "torchscript", "--out", out, "--no-verify"],
        "features": ["features", photo, "--checkpoint", ckpt, "--out", out],
        "convert": ["convert", ckpt, out, "--model", "eva02-tiny-p14_in21k-pre_3rdparty_in1k"],
        "mask-demo": ["mask-demo", photo, "--out", out],
    }[command]
    rc, stdout, err = run_cli(capsys, *argv, "--force")
    assert rc == 2 and stdout == ""
    one_error_line(err, command, "the source" if command == "convert" else "is also an input")
    assert target.read_bytes() == before and os.path.samefile(out, target)


def test_predict_drawings_never_take_an_input_name(files, capsys, tmp_path):
    """Drawing into the folder of the images: 'cat_topk.png' is an input, so cat.png's drawing is numbered."""
    root, imgs = files
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.png").write_bytes((imgs / "cat.png").read_bytes())
    Image.fromarray(data.astronaut()).save(d / "cat_topk.png")  # a square photo named like a drawing
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    rc, out, err = run_cli(capsys, "predict", d, "--checkpoint", root / "m.safetensors", "--out", d, "-k", "1")
    assert rc == 0, err
    assert out.splitlines()[::2] == [str(d / "cat.png"), str(d / "cat_topk.png")]  # both classified
    assert {n: (d / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in d.iterdir()) == ["cat.png", "cat_topk-1.png", "cat_topk.png", "cat_topk_topk.png"]
    with Image.open(d / "cat_topk-1.png") as a, Image.open(d / "cat_topk_topk.png") as b:
        assert a.width == b.width == 512 and a.height < b.height  # the cat's drawing, the square photo's


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_predict_drawings_skip_links_to_inputs(files, capsys, tmp_path, kind):
    root, imgs = files
    photo = tmp_path / "cat.png"
    photo.write_bytes((imgs / "cat.png").read_bytes())
    before = photo.read_bytes()
    out_dir = tmp_path / "drawn"
    out_dir.mkdir()
    link = make_alias(photo, out_dir / "cat_topk.png", kind)
    rc, _, err = run_cli(capsys, "predict", photo, "--checkpoint", root / "m.safetensors", "--out", out_dir, "--force")
    assert rc == 0, err
    assert photo.read_bytes() == before and os.path.samefile(link, photo)
    assert sorted(p.name for p in out_dir.iterdir()) == ["cat_topk-1.png", "cat_topk.png"]


# -------------------------------------------------------------------------- never over a file unless --force
def test_existing_outputs_need_force(files, capsys, tmp_path, monkeypatch):
    root, imgs = files
    ckpt = root / "m.safetensors"
    cases = {
        "features": (["features", imgs, "--checkpoint", ckpt, "--out"], tmp_path / "f.npy"),
        "export": (["export", "--checkpoint", ckpt, "--format", "torchscript", "--no-verify", "-o"], tmp_path / "m.ts"),
        "mask-demo": (["mask-demo", imgs / "cat.png", "--scale", "1", "--out"], tmp_path / "mask.png"),
    }
    for command, (argv, out) in cases.items():
        rc, _, err = run_cli(capsys, *argv, out)
        assert rc == 0 and out.is_file(), err
        first = out.read_bytes()
        rc, stdout, err = run_cli(capsys, *argv, out)
        assert rc == 2 and stdout == ""
        one_error_line(err, command, "already exists; pass --force")
        assert out.read_bytes() == first
        rc, _, err = run_cli(capsys, *argv, out, "--force")
        assert rc == 0, err
    # the listing beside a .npy is an output too
    (tmp_path / "g.npy.txt").write_text("mine\n")
    rc, _, err = run_cli(capsys, "features", imgs, "--checkpoint", ckpt, "--out", tmp_path / "g.npy")
    assert rc == 2 and "g.npy.txt already exists" in err and not (tmp_path / "g.npy").exists()
    # bench: the report path is refused before anything is timed
    import eva02.cli.bench as cli_bench

    monkeypatch.setattr(cli_bench, "load_harness", lambda: pytest.fail("the benchmark ran"))
    (tmp_path / "r.json").write_text("{}")
    rc, _, err = run_cli(capsys, "bench", "--models", "test-56", "--json", tmp_path / "r.json")
    assert rc == 2
    one_error_line(err, "bench", "already exists; pass --force")


def test_plot_existing_pictures_need_force(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    work = tmp_path / "run"
    work.mkdir()
    recs = [{"kind": "train", "step": s, "loss": 2.0 / s, "lr": 0.1} for s in (1, 2, 3)]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rc, out, err = run_cli(capsys, "plot", work)
    assert rc == 0 and out.split() == [str(work / "loss.png"), str(work / "lr.png")], err
    drawn = {p.name: p.stat().st_mtime_ns for p in work.glob("*.png")}
    rc, out, err = run_cli(capsys, "plot", work)
    assert rc == 2 and out == ""
    one_error_line(err, "plot", "already holds loss.png, lr.png; pass --force to replace them")
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.png")} == drawn
    # another folder has none of them yet; -o is --out
    rc, out, err = run_cli(capsys, "plot", work, "-o", tmp_path / "curves")
    assert rc == 0 and sorted(p.name for p in (tmp_path / "curves").iterdir()) == ["loss.png", "lr.png"], err
    rc, out, err = run_cli(capsys, "plot", work, "--force")
    assert rc == 0 and len(out.split()) == 2, err


def test_predict_existing_drawings_need_force(files, capsys, tmp_path):
    root, imgs = files
    argv = ["predict", imgs, "--checkpoint", root / "m.safetensors", "--out", tmp_path / "drawn", "-k", "1"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    drawn = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "drawn").iterdir()}
    assert sorted(drawn) == ["cat_topk.png", "coffee_topk.jpg"]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""  # refused before any image is classified
    one_error_line(err, "predict", "already exists; pass --force")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "drawn").iterdir()} == drawn
    rc, out, err = run_cli(capsys, *argv, "--force")
    assert rc == 0 and len(out.splitlines()) == 4, err


# ------------------------------------------------------------------------ bad output paths, before any work
def bad_output_cases(root: Path, imgs: Path, blocker: Path) -> dict[str, list]:
    """Each command with an output below a plain file; its inputs would fail too, but only later."""
    missing = root / "missing.safetensors"
    return {
        "predict": ["predict", imgs, "--checkpoint", missing, "--out", blocker],
        "features": ["features", imgs, "--checkpoint", missing, "--out", blocker / "f.npy"],
        "export": ["export", "--checkpoint", missing, "--format", "torchscript", "--out", blocker / "m.ts"],
        "convert": ["convert", root / "m.safetensors", blocker / "c.safetensors", "--model", "no-such-model"],
        "mask-demo": ["mask-demo", root / "missing.png", "--out", blocker / "mask.png"],
        "bench": ["bench", "--models", "test-56", "--json", blocker / "r.json"],
    }


@pytest.mark.parametrize("command", ["predict", "features", "export", "convert", "mask-demo", "bench", "plot"])
def test_output_below_a_file_is_one_line_before_work(files, capsys, tmp_path, monkeypatch, command):
    root, imgs = files
    blocker = tmp_path / "photo.jpg"
    blocker.write_bytes(b"not a folder")
    import eva02.cli.bench as cli_bench

    monkeypatch.setattr(cli_bench, "load_harness", lambda: pytest.fail("the benchmark ran"))
    if command == "plot":
        pytest.importorskip("matplotlib")
        work = tmp_path / "run"
        work.mkdir()
        recs = [{"kind": "train", "step": s, "loss": 2.0 / s, "lr": 0.1} for s in (1, 2, 3)]
        (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        argv = ["plot", work, "--out", blocker / "curves"]
    else:
        argv = bad_output_cases(root, imgs, blocker)[command]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    one_error_line(err, command, str(blocker))
    assert "file" in err and "missing" not in err and "no-such-model" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["photo.jpg"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(files, capsys, tmp_path):
    root, imgs = files
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = run_cli(capsys, "features", imgs, "--checkpoint", root / "m.safetensors", "--out", ro / "f.npy")
        assert rc == 2
        one_error_line(err, "features", "permission denied")
        rc, _, err = run_cli(capsys, "predict", imgs, "--checkpoint", root / "m.safetensors", "--out", ro)
        assert rc == 2
        one_error_line(err, "predict", "permission denied")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------- the umask's permissions
WRITERS = ["features-npy", "features-safetensors", "predict-drawing", "mask-demo", "export", "bench", "plot"]


def write_with(writer: str, files, out_dir: Path) -> list[Path]:
    """Run one writer into `out_dir`; returns the files it should have written."""
    root, imgs = files
    ckpt = root / "m.safetensors"
    if writer.startswith("features"):
        out = out_dir / ("f.npy" if writer.endswith("npy") else "f.safetensors")
        assert main(["features", str(imgs), "--checkpoint", str(ckpt), "--out", str(out)]) == 0
        return [out, out_dir / "f.npy.txt"] if out.suffix == ".npy" else [out]
    if writer == "predict-drawing":
        assert main(["predict", str(imgs / "cat.png"), "--checkpoint", str(ckpt), "--out", str(out_dir)]) == 0
        return [out_dir / "cat_topk.png"]
    if writer == "mask-demo":
        assert main(["mask-demo", str(imgs / "cat.png"), "--out", str(out_dir / "m.png"), "--scale", "1"]) == 0
        return [out_dir / "m.png"]
    if writer == "export":
        argv = ["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--no-verify"]
        assert main([*argv, "--out", str(out_dir / "m.ts")]) == 0
        return [out_dir / "m.ts"]
    if writer == "bench":
        from eva02.cli.bench import write_json

        write_json({"results": {}}, out_dir / "r.json")
        return [out_dir / "r.json"]
    pytest.importorskip("matplotlib")
    from eva02.engine.plot import plot_run

    (out_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0, "lr": 0.1}\n')
    return plot_run(out_dir)


@pytest.mark.parametrize("umask", [0o022, 0o002])
@pytest.mark.parametrize("writer", WRITERS)
def test_files_get_the_umask_permissions(files, capsys, tmp_path, writer, umask):
    old = os.umask(umask)
    try:
        written = write_with(writer, files, tmp_path)
    finally:
        os.umask(old)
    capsys.readouterr()
    assert written
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


# ------------------------------------------------------------------------------ stdout's reader goes away
def start_into_closed_pipe(*argv) -> subprocess.Popen:
    """Start `python -m eva02 ARGV` with stdout a pipe whose reader has already gone (like `| true`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.Popen(
            [sys.executable, "-m", "eva02", *map(str, argv)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    finally:
        os.close(write_end)


class GoneReader(io.TextIOBase):
    """A stdout whose reader has gone: every write fails as a pipe's would, and it has no descriptor."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("argv", [["predict", "--json"], ["features", "--out", "f.npy"]], ids=["predict", "features"])
def test_closed_stdout_returns_141_quietly_in_process(files, tmp_path, capsys, monkeypatch, argv):
    """The commands' own handling of a gone reader; the real pipe and the interpreter's exit are the
    subprocess tests' (the slow one below and `test_predict_into_head`)."""
    root, imgs = files
    command, *rest = argv
    rest = [str(tmp_path / a) if a.endswith(".npy") else a for a in rest]
    monkeypatch.setattr(sys, "stdout", GoneReader())
    assert main([command, str(imgs), "--checkpoint", str(root / "m.safetensors"), *rest]) == 141
    assert capsys.readouterr().err == ""
    if command == "features":
        assert np.load(tmp_path / "f.npy").shape == (2, 128)  # the work was done before the message


@pytest.mark.slow  # two processes that each start Python and import torch
def test_closed_stdout_ends_quietly(files, tmp_path):
    root, imgs = files
    ckpt = root / "m.safetensors"
    # Both commands at once: each spends most of its time starting up, on a core of its own.
    procs = [
        start_into_closed_pipe("predict", imgs, "--checkpoint", ckpt, "--json"),
        start_into_closed_pipe("features", imgs, "--checkpoint", ckpt, "--out", tmp_path / "f.npy"),
    ]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 141 and err == "", (p.args, err)
    assert np.load(tmp_path / "f.npy").shape == (2, 128)  # the work was done before the message


def test_predict_into_head(files, tmp_path):
    """The shell pipeline of the bug report, with more output than one pipe buffer: the first result
    line arrives and the command ends without a word on stderr."""
    root, _ = files
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    ckpt = root / "m.safetensors"
    cmd = f"'{sys.executable}' -m eva02 predict '{tmp_path}' --checkpoint '{ckpt}' -k 10 -b 4 | head -n 1"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode in (0, 141) and proc.stderr == "", proc.stderr
    assert proc.stdout == f"{tmp_path / '00.png'}\n"
