"""What a training run prints: in a log file, plain progress lines (no carriage-return redraws), and an
error on a line of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_engine_digits import config_text, write_digits

ROOT = Path(__file__).resolve().parents[1]


def test_log_file_gets_plain_lines_and_errors_on_their_own_line(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "d", limit=60)
    cfg = tmp_path / "c.py"
    cfg.write_text(config_text(root, epochs=2, batch=8, global_batch=8, log_every=2, max_steps=3))
    log = tmp_path / "run.log"
    with log.open("w") as f:  # stdout and stderr to a file, as under nohup or a job scheduler
        rc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), str(cfg), "--work-dir", str(tmp_path / "w")],
                            stdout=f, stderr=subprocess.STDOUT, timeout=300).returncode  # fmt: skip
    text = log.read_text()
    assert rc == 0, text[-2000:]
    assert "\r" not in text
    assert "epoch 1/2 step 2/6 (global 2/3): loss " in text and "img/s eta" in text
    # A run that stops with an error: the message is a line of its own, not glued to a progress line.
    cmd = [sys.executable, str(ROOT / "tools/train.py"), str(cfg), "--work-dir", str(tmp_path / "w")]
    with log.open("w") as f:
        rc = subprocess.run([*cmd, "--set", "train.max_steps=9"], stdout=f, stderr=subprocess.STDOUT, timeout=300)
    rc = rc.returncode
    lines = log.read_text().splitlines()
    assert rc == 2 and any(line.startswith("eva02 train: error: work dir") for line in lines), lines
