"""A training run never loses or mixes up a user's work: resume of every shipped config, refusal to start
over a previous run, the work-dir lock, checkpoints only of weights that still train, the bad-image cap
per epoch, full or unwritable work dirs, damaged checkpoints, leftovers of killed writers, file modes,
metrics after a resume, and the collective timeout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine_digits import config_text, write_digits

from eva02.cli import main
from eva02.engine import checkpoint as ckpt
from eva02.engine.config import load_run, override, parse_options
from eva02.engine.train import Trainer, TrainingError
from eva02.fileio import DirLock, OutputError, temp_path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs" / "eva02").glob("*.py"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"), limit=100)  # 80 train, 20 val


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A small random teacher for the MIM configs (theirs is a 1B-parameter download)."""
    from eva02.model import Eva02, Eva02Config
    from eva02.weights.load import save_checkpoint

    cfg = Eva02Config(dim=32, depth=1, heads=1, mlp_hidden=64, img_size=16, patch_size=4)
    return save_checkpoint(Eva02(cfg), tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


def _cfg_file(tmp_path: Path, root: Path, **kw) -> Path:
    p = tmp_path / "cfg.py"
    p.write_text(config_text(root, **{"epochs": 1, "batch": 8, "global_batch": 16, **kw}))
    return p


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _reduced(path: Path, root: Path, teacher: Path, *extra: str):
    """A shipped config at test size: a 2-block 32-wide model on 16 px digits, a few steps, no downloads."""
    cfg, task = load_run(path)
    sets = [
        "model.name=test", "model.init=", "model.img_size=16", "model.patch_size=4", "model.dim=32",
        "model.heads=1", "model.mlp_hidden=64", "model.depth=2", f"data.root={root}", "data.batch_size=8",
        "data.eval_batch_size=8", "data.workers=0", "optim.global_batch=16", "schedule.epochs=1", "train.amp=none",
        "train.threads=1", "train.parallel=ddp", "train.compile=false", "train.grad_checkpointing=false",
        "checkpoint.every_steps=1", "train.log_every=1",
    ]  # fmt: skip
    if cfg.train.task == "mim":
        sets += ["mim.teacher_kind=eva02", f"mim.teacher_name={teacher}", "mim.teacher_pretrained=", "data.val_split="]
    else:
        sets += ["model.num_classes=10"]
    return override(cfg, parse_options([*sets, *extra])), task


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_resumes(path: Path, digits: Path, teacher: Path, tmp_path: Path) -> None:
    cfg, task = _reduced(path, digits, teacher, "train.max_steps=2")
    Trainer(cfg, tmp_path / "wd", task).fit()
    first = ckpt.load(tmp_path / "wd" / "checkpoints" / "last.pt")
    cfg, task = _reduced(path, digits, teacher, "train.max_steps=3")
    trainer = Trainer(cfg, tmp_path / "wd", task, resume="auto")
    assert trainer.global_step == 2
    assert trainer.fit()["global_step"] == 3
    key = "backbone.patch_embed.proj.weight" if cfg.train.task == "mim" else "patch_embed.proj.weight"
    last = ckpt.load(tmp_path / "wd" / "checkpoints" / "last.pt")
    if cfg.model.patch_grad_scale == 0:  # detached: no optimizer state was saved for it, and it never moved
        assert key not in first["optimizer"]["state"]
        torch.testing.assert_close(last["model"][key], first["model"][key], rtol=0, atol=0)
    else:
        assert not torch.equal(last["model"][key], first["model"][key])


def test_new_run_refuses_a_previous_run_then_overwrite(digits: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg_file(tmp_path, digits, max_steps=3, every_steps=1)
    wd = tmp_path / "wd"
    assert main(["train", str(cfg), "--work-dir", str(wd)]) == 0
    before = {p: _digest(p) for p in wd.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert main(["train", str(cfg), "--work-dir", str(wd), "--set", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p: _digest(p) for p in wd.rglob("*") if p.is_file() and p.name != ".lock"} == before
    # --overwrite starts over: the old run's later step files do not survive to shadow the new ones.
    assert main(["train", str(cfg), "--work-dir", str(wd), "--set", "train.max_steps=1", "--overwrite"]) == 0
    assert sorted(p.name for p in (wd / "checkpoints").glob("step_*.pt")) == ["step_00000001.pt"]
    assert ckpt.load(wd / "checkpoints" / "last.pt")["global_step"] == 1


def test_a_second_run_in_a_locked_work_dir_is_refused(digits: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg_file(tmp_path, digits, max_steps=1)
    wd = tmp_path / "wd"
    code = "import sys, time; from eva02.fileio import DirLock; DirLock(sys.argv[1]).acquire(); print('ok'); "
    code += "sys.stdout.flush(); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(wd)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert main(["train", str(cfg), "--work-dir", str(wd)]) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid={holder.pid}" in err
        assert not (wd / "config.json").exists() and not (wd / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", str(cfg), "--work-dir", str(wd)]) == 0  # the dead holder's lock is taken over
    out = capsys.readouterr()
    assert "took over the lock of a run that is no longer running (host=" in out.out + out.err


def test_exploding_run_keeps_only_checkpoints_that_still_train(digits: Path, tmp_path: Path) -> None:
    cfg_file = _cfg_file(tmp_path, digits, lr=1e9, every_steps=1, warmup=0.0, epochs=3)
    cfg, task = load_run(cfg_file)
    wd = tmp_path / "wd"
    with pytest.raises(TrainingError, match="non-finite") as e:
        Trainer(cfg, wd, task).fit()
    # Step 1's update (lr 1e9) left finite but useless weights; step 2's loss on them is NaN. Their
    # checkpoint is set aside, so neither last.pt nor the message points at weights that cannot train.
    assert "global step 2" in str(e.value) and "no checkpoint before it is kept" in str(e.value)
    d = wd / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["last.pt.nonfinite", "step_00000001.pt.nonfinite"]


def test_save_refuses_non_finite_weights(digits: Path, tmp_path: Path) -> None:
    cfg, task = load_run(_cfg_file(tmp_path, digits, max_steps=2))
    trainer = Trainer(cfg, tmp_path / "wd", task)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.save()
    assert not list((tmp_path / "wd" / "checkpoints").glob("*.pt"))
    trainer.close()


def test_bad_image_cap_counts_per_epoch_and_val_images_are_named(tmp_path: Path, capsys) -> None:
    root = write_digits(tmp_path / "ds", limit=75)  # 60 train images
    (root / "train" / "digit_0" / "broken.png").write_bytes(b"not a png")
    (root / "val" / "digit_1" / "broken_val.png").write_bytes(b"")
    cfg_file = _cfg_file(tmp_path, root, epochs=3, global_batch=8, batch=8)
    cfg, task = load_run(cfg_file)
    cfg = override(cfg, {"data.max_bad_fraction": "0.02"})  # 1.22 of 61 allowed per epoch; 3 in 3 epochs
    metrics = Trainer(cfg, tmp_path / "wd", task).fit()
    assert metrics["global_step"] == 3 * (61 // 8)
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped unreadable validation image" in err and "broken_val.png" in err


def test_full_disk_during_a_checkpoint_write(digits: Path, tmp_path: Path, monkeypatch) -> None:
    cfg, task = load_run(_cfg_file(tmp_path, digits, max_steps=4, every_steps=2))
    wd = tmp_path / "wd"
    real_save = torch.save
    calls = []

    def save_then_fail(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: write some bytes, then the device is full
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 498")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(TrainingError, match="no space left on the device") as e:
        Trainer(cfg, wd, task).fit()
    assert "last.pt" in str(e.value)
    d = wd / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["last.pt", "step_00000002.pt"]  # no temporary, no torn file
    assert ckpt.load(d / "last.pt")["global_step"] == 2


def test_work_dir_that_is_a_file_or_read_only(digits: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg_file(tmp_path, digits, max_steps=1)
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["train", str(cfg), "--work-dir", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["train", str(cfg), "--work-dir", str(f / "sub")]) == 2
    assert f.read_text() == "x"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["train", str(cfg), "--work-dir", str(ro / "wd")]) == 2
        assert "permission denied" in capsys.readouterr().err


def test_damaged_checkpoints(digits: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg_file(tmp_path, digits, max_steps=4, every_steps=2)
    wd = tmp_path / "wd"
    assert main(["train", str(cfg), "--work-dir", str(wd), "--set", "train.max_steps=3"]) == 0
    d = wd / "checkpoints"
    # A torn last.pt: resume falls back to the newest periodic checkpoint that loads, and says so.
    (d / "last.pt").unlink()
    (d / "last.pt").write_bytes((d / "step_00000003.pt").read_bytes()[:1000])
    (d / "step_00000003.pt").write_bytes(b"")
    capsys.readouterr()
    assert main(["train", str(cfg), "--work-dir", str(wd), "--resume"]) == 0
    out = capsys.readouterr()
    assert "step_00000002.pt instead" in out.err and "resumed from" in out.out + out.err
    # Explicit bad files: one line each, exit 2.
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    intkeys = tmp_path / "intkeys.pt"
    torch.save({"format": "eva02-train", "model": {0: torch.zeros(1)}}, intkeys)
    code = tmp_path / "code.pt"
    torch.save({"format": "eva02-train", "model": {}, "x": Path("/")}, code)  # a pickle that needs a class
    for bad, why in ((empty, "empty"), (intkeys, "parameter names"), (code, "Python objects")):
        assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w2"), "--resume", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and why in err, err
    # A resume that changes the architecture: named, exit 2.
    assert main(["train", str(cfg), "--work-dir", str(wd), "--resume", "--set", "model.dim=32"]) == 2
    err = capsys.readouterr().err
    assert "model.dim=64" in err and "architecture" in err


def test_stale_temporaries_removed_and_file_modes(digits: Path, tmp_path: Path) -> None:
    cfg, task = load_run(_cfg_file(tmp_path, digits, max_steps=2, every_steps=1))
    wd = tmp_path / "wd"
    (wd / "checkpoints").mkdir(parents=True)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip
    stale = temp_path(wd / "checkpoints" / "step_00000009.pt")
    stale = stale.with_name(stale.name.replace(f".{os.getpid()}.", f".{dead}."))
    stale.write_bytes(b"half a checkpoint")
    old = os.umask(0o022)
    try:
        Trainer(cfg, wd, task).fit()
    finally:
        os.umask(old)
    assert not stale.exists()
    for name in ("config.json", "final.safetensors", "checkpoints/last.pt", "checkpoints/step_00000002.pt"):
        assert (wd / name).stat().st_mode & 0o777 == 0o644, name


def test_metrics_have_each_step_once_after_a_resume(digits: Path, tmp_path: Path) -> None:
    cfg, task = load_run(_cfg_file(tmp_path, digits, max_steps=4, every_steps=2, log_every=1))
    wd = tmp_path / "wd"
    Trainer(cfg, wd, task).fit()
    d = wd / "checkpoints"
    # As if killed after logging steps 3 and 4 but before the step-4 checkpoint was complete.
    (d / "last.pt").unlink()
    (d / "step_00000004.pt").unlink()
    os.link(d / "step_00000002.pt", d / "last.pt")
    (wd / "final.safetensors").unlink()
    Trainer(cfg, wd, task, resume="auto").fit()
    records = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def test_collective_timeout_comes_from_the_config(monkeypatch) -> None:
    import torch.distributed as dist

    from eva02.engine import dist as edist

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout, **kw: seen.update(timeout=timeout))
    edist.init_distributed("cpu", timeout_s=7)
    assert seen["timeout"].total_seconds() == 7
    from eva02.engine.config import RunConfig

    assert 0 < RunConfig().train.dist_timeout_s <= 1800
    with pytest.raises(ValueError, match="dist_timeout_s"):
        override(RunConfig(), {"train.dist_timeout_s": "0"})


def test_lock_is_released_after_fit_and_error(digits: Path, tmp_path: Path) -> None:
    cfg, task = load_run(_cfg_file(tmp_path, digits, max_steps=1))
    Trainer(cfg, tmp_path / "wd", task).fit()
    DirLock(tmp_path / "wd").acquire().release()  # free again
    with pytest.raises(OutputError):
        Trainer(cfg, tmp_path / "wd", task)  # a previous run: refused, and the lock is not kept
    DirLock(tmp_path / "wd").acquire().release()


def test_sigkill_during_a_checkpoint_write_then_resume(digits: Path, tmp_path: Path) -> None:
    """Killed while the second checkpoint is half written: the temporary is removed at the next start and
    the run resumes from the first checkpoint, never from a torn file."""
    cfg = _cfg_file(tmp_path, digits, max_steps=4, every_steps=2)
    wd = tmp_path / "wd"
    code = (
        "import sys, time, torch\n"
        "real, calls = torch.save, []\n"
        "def save(obj, f, *a, **k):\n"
        "    calls.append(f)\n"
        "    if len(calls) == 2:\n"
        "        open(f, 'wb').write(b'PK\\x03\\x04' + bytes(4096))\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(120)\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "from eva02.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", code, "train", str(cfg), "--work-dir", str(wd)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        while (line := proc.stdout.readline()) and line.strip() != "writing":
            pass
        assert line.strip() == "writing"
        temps = [p for p in (wd / "checkpoints").iterdir() if p.name.startswith(".")]
        assert len(temps) == 1  # the half-written step-4 checkpoint, under a temporary name
    finally:
        proc.kill()
        proc.wait()
    assert ckpt.load(wd / "checkpoints" / "last.pt")["global_step"] == 2
    assert main(["train", str(cfg), "--work-dir", str(wd), "--resume"]) == 0
    assert not temps[0].exists()
    assert not [p for p in (wd / "checkpoints").iterdir() if p.name.startswith(".")]
    assert ckpt.load(wd / "checkpoints" / "last.pt")["global_step"] == 4


def test_eva02_test_refuses_a_training_checkpoint_with_nan_weights(digits: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg_file(tmp_path, digits, max_steps=1)
    wd = tmp_path / "wd"
    assert main(["train", str(cfg), "--work-dir", str(wd)]) == 0
    state = ckpt.load(wd / "checkpoints" / "last.pt")
    state["model"]["head.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    capsys.readouterr()
    assert main(["test", str(cfg), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "head.weight" in err and str(bad) in err and not (tmp_path / "test_nan.json").exists()
