"""Run metrics: JSON lines in the work dir (`metrics.jsonl`), TensorBoard when installed, and the
console (`Progress`: a tqdm progress bar with loss, lr, img/s and ETA, or plain lines in a log file).
Only rank 0 writes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eva02.fileio import atomic_write_text


class RunLog:
    """Append-only metric records: {'kind': 'train'|'eval'|'info', 'step': ..., ...}."""

    def __init__(self, work_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = work_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            work_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(work_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def truncate_after(self, step: int) -> int:
        """Drop records past `step` (written by a killed run after the checkpoint it resumes from), so
        that every step appears once; returns how many were dropped. The file is rewritten atomically."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a torn last line
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                dropped += 1
                continue
            kept.append(line + "\n")
        if dropped:
            atomic_write_text(self.path, "".join(kept))
        return dropped

    def info(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg)

    def warn(self, msg: str) -> None:
        """A warning from any rank (e.g. the unreadable images it met), on stderr."""
        tqdm.write(f"warning: {msg}", file=sys.stderr)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """What the loop reports after each optimizer step: a 'train' record every `log_every` steps (and at
    the first), and on rank 0 a live progress bar per epoch on a terminal or, in a log file, a plain line
    at each record instead of redraws. Used as a context manager: the bar is closed (its line ended)
    before an error message is printed."""

    def __init__(self, log: RunLog, epochs: int, steps_per_epoch: int, total_steps: int, log_every: int) -> None:
        self.log, self.live = log, log.enabled and sys.stderr.isatty()
        self.epochs, self.steps_per_epoch, self.total_steps, self.log_every = (
            epochs,
            steps_per_epoch,
            total_steps,
            log_every,
        )
        self.bar = None
        self.t_start, self.done = time.time(), 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self, epoch: int, step_in_epoch: int, global_step: int, loss: float, lr: float, img_s: float) -> None:
        """Report the step that brought the run to `global_step` (`step_in_epoch` of epoch `epoch`, 0-based)."""
        self.done += 1
        eta = format_eta((time.time() - self.t_start) / self.done * (self.total_steps - global_step))
        record = global_step % self.log_every == 0 or global_step == 1
        if record:
            self.log.write("train", global_step, epoch=epoch, loss=loss, lr=lr, img_s=img_s)
        if self.live:
            if self.bar is None:
                self.bar = tqdm(total=self.steps_per_epoch, initial=step_in_epoch - 1, dynamic_ncols=True,
                                desc=f"epoch {epoch + 1}/{self.epochs}")  # fmt: skip
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}", eta=eta)
            if step_in_epoch == self.steps_per_epoch:
                self.close()
        elif record:
            self.log.info(
                f"epoch {epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch} (global {global_step}/"
                f"{self.total_steps}): loss {loss:.4f} lr {lr:.2e} {img_s:.0f} img/s eta {eta}"
            )

    def close(self) -> None:
        """End the bar's line (if a bar is shown)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_metrics(work_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (a torn last line from a killed run is ignored)."""
    path = Path(work_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found; pass the work dir of a training run")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def format_eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
