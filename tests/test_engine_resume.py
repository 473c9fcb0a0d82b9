"""Resume after SIGKILL: a run killed mid-epoch and resumed with `--resume auto` ends with the same weights
(and EMA) as an uninterrupted run, with drop path, RandAugment and EMA on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_engine_digits import config_text, write_digits

from eva02.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_mid_epoch_then_resume_auto_matches_uninterrupted(tmp_path: Path, capsys) -> None:
    root = write_digits(tmp_path / "digits", limit=300)
    cfg = tmp_path / "cfg.py"
    # 240 train images, global batch 16: 15 steps per epoch, 2 epochs; a checkpoint every 4 steps.
    cfg.write_text(config_text(root, epochs=2, batch=8, global_batch=16, drop_path=0.2, randaug=2, ema=True,
                               every_steps=4, log_every=1))  # fmt: skip
    # The uninterrupted run and the resume need no process of their own (only the killed run does):
    # in this process they skip the interpreter's start and torch's import.
    full = tmp_path / "full"
    assert main(["train", str(cfg), "--work-dir", str(full)]) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "tools/train.py"), str(cfg), "--work-dir", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step_00000008.pt"  # mid first epoch
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # it was still running: a real interruption
    last = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert 8 <= last["global_step"] < 30
    assert not (killed / "final.safetensors").exists()

    capsys.readouterr()
    assert main(["train", str(cfg), "--work-dir", str(killed), "--resume", "auto"]) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.err + out.out
    for name in ("final.safetensors", "final_ema.safetensors"):
        a, b = load_file(full / name), load_file(killed / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)

    # The resumed run logged the remaining steps with the uninterrupted run's losses.
    def losses(wd: Path) -> dict[int, float]:
        recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}

    lf, lk = losses(full), losses(killed)
    assert len(lf) == 30 and all(abs(lk[s] - lf[s]) < 1e-6 for s in lf if s > last["global_step"])
    # Periodic checkpoints were pruned to keep_last=2, plus last.pt and best.pt.
    kept = sorted(p.name for p in (full / "checkpoints").glob("*.pt"))
    assert kept == ["best.pt", "last.pt", "step_00000028.pt", "step_00000030.pt"], kept
