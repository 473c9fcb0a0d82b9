"""Safe file output for every writer of the package: atomic writes that honour the umask, output checks
made before any work (never onto an input, never over an existing file without `force`), clean-up of the
temporaries that killed writers leave behind, and an exclusive lock on a folder (training work dirs).

Imports nothing from the rest of the package, so every layer (weights, data, engine, cli) can use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PathLike = str | os.PathLike

# Temporaries are named `.{final name}.{host}.{pid}.{random}{suffix}`: the pid and host say whether the
# writer is still alive, so a later run removes only the leftovers of dead writers.
_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]{8})(?P<suffix>\..+)$"
)
TEMP_SUFFIXES = (".tmp", ".part")


class OutputError(ValueError):
    """An output path that cannot or must not be written; the message names it and the fix."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")


def current_umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path(path: PathLike, suffix: str = ".tmp") -> Path:
    """A fresh temporary name beside `path` that `clean_stale_temps` can attribute to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def atomic_write(path: PathLike, write: Callable[[str], None], suffix: str = ".tmp", mode: int | None = None) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it onto `path`.

    A crash or an error never leaves half a file under the real name (the temporary is removed on
    error); the file gets the permissions a plain `open()` would give (0666 minus the umask) unless
    `mode` is given. `suffix` is appended to the temporary name (keep a real extension there for
    writers that insist on one, e.g. '.tmp.pt2').
    """
    path = Path(path)
    tmp = temp_path(path, suffix)
    try:
        write(str(tmp))
        if not tmp.exists():  # the writer chose to write nothing
            raise OSError(errno.ENOENT, "the writer produced no file", str(tmp))
        os.chmod(tmp, (0o666 & ~current_umask()) if mode is None else mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when `a` and `b` are the same file (same path, a symlink or a hard link to it)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _describe_os_error(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "the file system is read-only"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    return e.strerror or str(e)


def describe_os_error(e: OSError) -> str:
    """A short reason for an OSError met while writing (read-only, full, permission denied, ...)."""
    return _describe_os_error(e)


def check_writable_dir(folder: PathLike, what: str = "output folder") -> Path:
    """Make sure `folder` exists (creating it) and a file can be created in it; OutputError if not."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to {what} {folder}: {_describe_os_error(e)}; choose another folder") from None
    return folder


def check_output(
    path: PathLike, inputs: Iterable[PathLike] = (), force: bool = False, flag: str = "--out", create_dir: bool = True
) -> Path:
    """Check, before any work, that `path` may be written: not a folder, not one of `inputs` (by
    inode, so symlinks and hard links count), not an existing file unless `force`, and its folder
    writable. Returns the path; raises OutputError with the flag, the path and the fix.
    """
    path = Path(path)
    for src in inputs:
        if src is not None and os.path.exists(path) and same_file(path, src):
            raise OutputError(f"{flag} {path} is also an input ({src}); write to another file")
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name inside it")
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputError(f"{flag} {path} already exists; pass --force to replace it or choose another name")
    parent = path.parent
    if create_dir:
        check_writable_dir(parent, f"the folder of {flag} {path},")
    elif not parent.is_dir():
        raise OutputError(f"{flag} {path}: folder {parent} does not exist")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: PathLike, recursive: bool = False) -> list[Path]:
    """Remove temporaries (see `temp_path`) left in `folder` by dead writers of this host; returns them.

    Temporaries of live processes and of other hosts (a shared file system) are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, host = [], _host()
    for f in folder.rglob(".*") if recursive else folder.glob(".*"):
        m = _TEMP_RE.match(f.name)
        if not m or not m.group("suffix").startswith(TEMP_SUFFIXES) or m.group("host") != host:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            f.unlink()
            removed.append(f)
    return removed


class LockedError(OutputError):
    """The folder is locked by another live process."""


class DirLock:
    """An exclusive advisory lock on a folder (`fcntl.flock` on `{folder}/.lock`), held until `release()`.

    The lock file records the holder's host, pid and start time; the kernel drops the lock when the
    holder dies, so a lock left by a killed run is taken over (and reported through `previous`).
    """

    NAME = ".lock"

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.fd: int | None = None
        self.previous: str | None = None  # holder recorded in a lock file taken over from a dead run

    def acquire(self) -> DirLock:
        check_writable_dir(self.folder, "work dir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise LockedError(
                    f"work dir {self.folder} is in use by another run ({holder or 'unknown process'}); "
                    "wait for it to finish or choose another --work-dir"
                ) from None
            raise
        self.previous = self._read(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()} since={time.strftime('%F %T')}\n".encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> str:
        try:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()
