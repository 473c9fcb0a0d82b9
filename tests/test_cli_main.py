"""The command line's own behaviour: positionals anywhere around `--set`, `--version`, and `eva02 test`'s
results file placed beside the checkpoint and checked before the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_engine_digits import config_text, write_digits

from eva02 import __version__
from eva02.cli import _positionals_last, main


def test_positionals_after_set_options() -> None:
    argv = ["test", "cfg.py", "--set", "a.b=1", "ckpt.pt", "--cfg-options", "c.d=2", "--per-class"]
    assert _positionals_last(argv) == ["test", "cfg.py", "--set", "a.b=1", "--cfg-options", "c.d=2", "--per-class",
                                       "--", "ckpt.pt"]  # fmt: skip
    assert _positionals_last(["train", "c.py", "--set", "x.y=-1", "--resume"]) == ["train", "c.py", "--set",
                                                                                  "x.y=-1", "--resume"]  # fmt: skip


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"eva02 {__version__}"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("run")
    root = write_digits(tmp / "digits", limit=60)
    cfg = tmp / "cfg.py"
    cfg.write_text(config_text(root, epochs=1, batch=8, global_batch=8, max_steps=2))
    assert main(["train", str(cfg), "--work-dir", str(tmp / "wd")]) == 0
    return cfg, tmp / "wd"


def test_test_results_beside_the_checkpoint_with_set_before_it(run, tmp_path, monkeypatch, capsys) -> None:
    cfg, wd = run
    monkeypatch.chdir(tmp_path)  # not where the run is: nothing may land here
    assert main(["test", str(cfg), "--set", "data.batch_size=4", str(wd / "checkpoints" / "last.pt")]) == 0
    out = wd / "test_last.json"
    assert json.loads(out.read_text())["count"] == 12
    assert main(["test", str(cfg), str(wd / "final.safetensors")]) == 0
    assert (wd / "test_final.json").is_file()
    assert not list(tmp_path.iterdir())
    # An existing results file is not replaced without --force; the check comes before any evaluation.
    capsys.readouterr()
    assert main(["test", str(cfg), str(wd / "final.safetensors")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["test", str(cfg), str(wd / "final.safetensors"), "--force"]) == 0
    # Never onto the checkpoint itself.
    assert main(["test", str(cfg), str(wd / "final.safetensors"), "--out", str(wd / "final.safetensors"),
                 "--force"]) == 2  # fmt: skip
    assert "also an input" in capsys.readouterr().err
