"""What a training run prints: in a log file, plain progress lines (no carriage-return redraws), and an
error on a line of its own.

The default test runs the command in this process with stdout and stderr captured at the file
descriptors (not terminals, as in a log file); the slow one runs `tools/train.py` with both written
to one real file, as under nohup or a job scheduler.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_engine_digits import config_text, write_digits

from eva02.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _start(cfg: Path, wd: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`tools/train.py` with stdout and stderr to a file, as under nohup or a job scheduler."""
    cmd = [sys.executable, str(ROOT / "tools/train.py"), str(cfg), "--work-dir", str(wd), *extra]
    with log.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _config_and_taken_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A 3-step run's config, and a work dir that holds an earlier run (its metrics): a new start there
    stops with an error."""
    root = write_digits(tmp_path / "d", limit=60)
    cfg = tmp_path / "c.py"
    cfg.write_text(config_text(root, epochs=2, batch=8, global_batch=8, log_every=2, max_steps=3))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0, "lr": 0.1}\n')
    return cfg, taken


def test_plain_lines_and_errors_on_their_own_line_when_output_is_not_a_terminal(tmp_path: Path, capfd) -> None:
    cfg, taken = _config_and_taken_dir(tmp_path)
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w")]) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert "epoch 1/2 step 2/6 (global 2/3): loss " in out + err and "img/s eta" in out + err
    assert all(s.endswith("\n") for s in (out, err) if s)  # whole lines only: nothing for a later line to glue onto
    assert main(["train", str(cfg), "--work-dir", str(taken), "--set", "train.max_steps=9"]) == 2
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert any(line.startswith("eva02 train: error: work dir") for line in lines), lines


@pytest.mark.slow  # two processes that each start Python and import torch
def test_log_file_gets_plain_lines_and_errors_on_their_own_line(tmp_path: Path) -> None:
    cfg, taken = _config_and_taken_dir(tmp_path)
    # Both runs at once: each spends most of its time starting up.
    log, err_log = tmp_path / "run.log", tmp_path / "error.log"
    procs = _start(cfg, tmp_path / "w", log), _start(cfg, taken, err_log, "--set", "train.max_steps=9")
    rc, err_rc = map(_wait, procs)
    text = log.read_text()
    assert rc == 0, text[-2000:]
    assert "\r" not in text
    assert "epoch 1/2 step 2/6 (global 2/3): loss " in text and "img/s eta" in text
    # The error message is a line of its own, not glued to a progress line.
    lines = err_log.read_text().splitlines()
    assert err_rc == 2 and any(line.startswith("eva02 train: error: work dir") for line in lines), lines
