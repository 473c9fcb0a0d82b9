"""The safe-output helpers: atomic writes with the umask's permissions, output checks, stale temporaries
of dead writers, and the exclusive work-dir lock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from eva02 import fileio


def test_atomic_write_honours_umask_and_replaces(tmp_path):
    old = os.umask(0o027)
    try:
        p = fileio.atomic_write_text(tmp_path / "a.txt", "one")
    finally:
        os.umask(old)
    assert p.read_text() == "one"
    assert p.stat().st_mode & 0o777 == 0o640
    fileio.atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]  # no temporary left


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"old")

    def boom(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        fileio.atomic_write(p, boom)
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["w.bin"]


def test_check_output_refuses_inputs_links_existing_and_folders(tmp_path):
    src = tmp_path / "m.safetensors"
    src.write_bytes(b"x")
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    hard = tmp_path / "hard.safetensors"
    os.link(src, hard)
    for out in (src, link, hard):
        with pytest.raises(fileio.OutputError, match="also an input"):
            fileio.check_output(out, inputs=[src], force=True)
    with pytest.raises(fileio.OutputError, match="already exists; pass --force"):
        fileio.check_output(src)
    assert fileio.check_output(src, force=True) == src
    with pytest.raises(fileio.OutputError, match="is a folder"):
        fileio.check_output(tmp_path)
    with pytest.raises(fileio.OutputError, match="is a file, not a folder"):
        fileio.check_output(src / "f.npy")
    new = tmp_path / "sub" / "dir" / "o.npy"
    assert fileio.check_output(new) == new and new.parent.is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_check_output_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(fileio.OutputError, match="permission denied"):
            fileio.check_output(ro / "f.npy")
    finally:
        ro.chmod(0o755)


def test_clean_stale_temps_removes_dead_writers_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = fileio.temp_path(tmp_path / "last.pt")
    mine.write_bytes(b"live")
    stale = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{dead_pid}."))
    stale.write_bytes(b"dead")
    other_host = tmp_path / f".x.pt.otherhost.{dead_pid}.0123abcd.tmp"
    other_host.write_bytes(b"elsewhere")
    user = tmp_path / ".hidden.tmp"
    user.write_bytes(b"user file")
    removed = fileio.clean_stale_temps(tmp_path)
    assert removed == [stale]
    assert mine.exists() and other_host.exists() and user.exists()


def test_dir_lock_is_exclusive_and_taken_over_after_death(tmp_path):
    code = (
        "import sys, time; from eva02.fileio import DirLock, LockedError\n"
        "try:\n    DirLock(sys.argv[1]).acquire()\nexcept LockedError as e:\n    print(e); sys.exit(3)\n"
        "print('got'); sys.stdout.flush(); time.sleep(float(sys.argv[2]))\n"
    )
    with fileio.DirLock(tmp_path) as lock:
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path), "0"], capture_output=True, text=True)
        assert r.returncode == 3, r.stderr
        assert f"pid={os.getpid()}" in r.stdout and "in use by another run" in r.stdout
        assert lock.previous is None
    # A holder killed with SIGKILL: the kernel drops its lock; the next run takes it over and sees who held it.
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "got"
    p.kill()
    p.wait()
    with fileio.DirLock(tmp_path) as lock:
        assert lock.previous and f"pid={p.pid}" in lock.previous


@pytest.mark.parametrize(("code", "words"), [(30, "the file system is read-only"), (28, "no space left on the device")])
def test_unwritable_folder_is_named_with_the_reason(tmp_path, monkeypatch, code, words):
    """A read-only mount or a full disk (simulated: root can write anywhere here) is one clear line."""
    import pathlib

    def refuse(self, *a, **k):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(pathlib.Path, "touch", refuse)
    with pytest.raises(fileio.OutputError, match=f"cannot write to work dir {tmp_path}: {words}"):
        fileio.DirLock(tmp_path).acquire()
    with pytest.raises(fileio.OutputError, match=words):
        fileio.check_output(tmp_path / "f.npy")
