"""Distributed training on CPU (gloo) under torchrun: 2 processes follow the 1-process loss trajectory on
the same global batch (DDP and FSDP2, EMA included), a 2-process checkpoint resumes in 1 process, and the
EMA of FSDP2 shards equals the EMA of the unsharded model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine_digits import config_text, write_digits

from eva02.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg: Path, wd: Path, nproc: int, *extra: str) -> subprocess.Popen:
    """`nproc` training processes under torchrun, started in the background; output in `wd`.log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
           str(ROOT / "tools/train.py"), str(cfg), "--work-dir", str(wd), *extra]  # fmt: skip
    with open(wd.with_suffix(".log"), "w") as log:  # a file, not a pipe: nobody reads it while it runs
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, wd: Path) -> None:
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, wd.with_suffix(".log").read_text()[-3000:]


def _run_here(cfg: Path, wd: Path, *extra: str) -> None:
    """One process: this one (no interpreter start, no torch import to wait for)."""
    assert main(["train", str(cfg), "--work-dir", str(wd), *extra]) == 0


def _losses(wd: Path) -> list[float]:
    recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dist")
    root = write_digits(tmp / "digits", limit=400)
    # 8 per device and a global batch of 32: 1 process accumulates 4 micro-batches, 2 processes 2 each.
    # Augmentation is seeded per sample, so it is the same for any split; drop path is seeded per
    # process and micro-batch, so it is off here (the resume test covers it at a fixed world size).
    text = config_text(root, epochs=1, batch=8, global_batch=32, log_every=1, max_steps=6, every_steps=3,
                       drop_path=0.0, randaug=2, ema=True)  # fmt: skip
    cfg = tmp / "cfg.py"
    cfg.write_text(text)
    ddp = _launch(cfg, tmp / "ddp", 2)
    try:
        _run_here(cfg, tmp / "one")  # while the two ranks start
    finally:
        _finish(ddp, tmp / "ddp")
    return {"cfg": cfg, "tmp": tmp, "one": tmp / "one", "ddp": tmp / "ddp"}


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_follow_one_process(runs: dict, mode: str) -> None:
    if mode == "fsdp":  # FSDP2 (fully_shard per block) on gloo: the same trajectory as well
        wd = runs["tmp"] / "fsdp"
        _finish(_launch(runs["cfg"], wd, 2, "--set", "train.parallel=fsdp"), wd)
        runs["fsdp"] = runs["tmp"] / "fsdp"
    one, two = _losses(runs["one"]), _losses(runs[mode])
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=2e-5)
    assert len(set(round(v, 4) for v in one)) > 1  # the loss moves: the comparison is not trivial
    for name in ("final.safetensors", "final_ema.safetensors"):  # the EMA: kept on shards under FSDP2
        w1, w2 = load_file(runs["one"] / name), load_file(runs[mode] / name)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)


def test_two_process_checkpoint_resumes_in_one_process(runs: dict) -> None:
    ck = runs["ddp"] / "checkpoints" / "step_00000003.pt"
    assert ck.is_file()
    wd = runs["tmp"] / "resumed"
    _run_here(runs["cfg"], wd, "--resume", str(ck))
    assert _losses(wd) == pytest.approx(_losses(runs["one"])[3:], abs=2e-5)
    for name in ("final.safetensors", "final_ema.safetensors"):
        w1, w2 = load_file(runs["one"] / name), load_file(wd / name)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (read from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _rank_pid(launcher: subprocess.Popen, rank: int, deadline: float) -> int:
    import time

    while time.time() < deadline:
        for pid in _children(launcher.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.2)
    raise AssertionError("the torchrun workers did not start")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stopped_rank_ends_the_run_promptly(runs: dict, sig: str) -> None:
    """A rank killed (or stopped) mid-run: the other rank stops within the collective timeout
    (train.dist_timeout_s, 8 s here) instead of waiting for the default 30 minutes."""
    import os
    import signal
    import time

    wd = runs["tmp"] / f"dead_{sig}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
           str(ROOT / "tools/train.py"), str(runs["cfg"]), "--work-dir", str(wd), "--set", "train.max_steps=400",
           "schedule.epochs=50", "train.dist_timeout_s=8"]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        victim = _rank_pid(launcher, 1, time.time() + 120)
        deadline = time.time() + 120
        while not (wd / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)  # training has started
        os.kill(victim, getattr(signal, sig))
        t0 = time.time()
        rc = launcher.wait(timeout=120)
        took = time.time() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in _children(launcher.pid):
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert rc != 0
    assert took < 60, f"the run took {took:.0f} s to stop after {sig} of rank 1"


def _ema_worker(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: the EMA of an FSDP2-sharded model against the EMA of the same
    model unsharded (every rank computes that reference itself)."""
    import os

    import torch.distributed as dist

    from eva02.engine.ema import ModelEma
    from eva02.engine.parallel import apply_fsdp
    from eva02.model import VARIANTS, Eva02

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        size = dict(dim=32, depth=2, heads=1, mlp_hidden=48, img_size=16, patch_size=4, num_classes=3)
        cfg = VARIANTS["test"].replace(**size)
        torch.manual_seed(0)
        plain, sharded = Eva02(cfg), Eva02(cfg)
        sharded.load_state_dict(plain.state_dict())
        apply_fsdp(sharded)  # cls_token, pos_embed (1 row): rank 1 holds an empty shard of them
        ref, ema = ModelEma(plain, 0.5), ModelEma(sharded, 0.5)
        for step in range(3):
            with torch.no_grad():
                for p, q in zip(plain.parameters(), sharded.parameters(), strict=True):
                    p.add_(float(step + 1))
                    q.to_local().add_(float(step + 1))
            ref.update(plain)
            ema.update(sharded)
        # Each rank keeps the average of its own shards only, not a full copy.
        full = sum(t.numel() for t in ref.shadow)
        assert sum(t.numel() for t in ema.shadow) < 0.6 * full
        averaged, expected = ema.state_dict(), ref.state_dict()  # gathered: collective
        assert averaged.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(averaged[k], expected[k], rtol=0, atol=0)
        # Evaluation runs the sharded model with the average swapped in, then with its own weights again.
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        live = sharded(x)
        with ema.swapped_into(sharded), torch.no_grad():
            plain_ema = Eva02(cfg)
            plain_ema.load_state_dict(expected)
            torch.testing.assert_close(sharded(x), plain_ema(x))
        torch.testing.assert_close(sharded(x), live)
        # A resumed average (full tensors in, shards kept) gathers to the same full tensors.
        again = ModelEma(sharded, 0.5)
        again.load_state_dict(expected)
        for k, v in again.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
        if rank == 0:
            Path(out).write_text("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes with FSDP2, like the other FSDP2 runs
def test_ema_on_fsdp2_shards_matches_the_full_average(tmp_path: Path) -> None:
    """Under FSDP2 the EMA is updated on each rank's shards without communication and gathered only to
    save or evaluate; its values are those of the EMA of the unsharded model."""
    import torch.multiprocessing as mp

    out = tmp_path / "ok"
    mp.start_processes(_ema_worker, args=(_port(), str(out)), nprocs=2, start_method="spawn")
    assert out.read_text() == "ok"
