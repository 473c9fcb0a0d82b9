"""A command whose optional dependency is missing says which extra to install, in one line, before any work;
a closed pipe ends any command quietly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eva02.cli import main
from eva02.extras import MissingExtra, need


@pytest.fixture
def hide(monkeypatch):
    """Make `import NAME` fail as if the package were not installed."""

    def _hide(*names: str) -> None:
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ModuleNotFoundError

    return _hide


def test_need_names_the_extra_in_both_forms(hide) -> None:
    hide("matplotlib", "matplotlib.pyplot")  # also when an earlier test imported it
    with pytest.raises(MissingExtra) as e:
        need("matplotlib.pyplot", "plot", "eva02 plot")
    msg = str(e.value)
    assert "eva02 plot needs matplotlib" in msg
    assert "pip install 'eva02[plot]'" in msg and "pip install -e '.[plot]'" in msg


@pytest.mark.parametrize(
    "argv, hidden, extra",
    [
        (["plot", "WD"], "matplotlib.pyplot", "plot"),
        (["bench", "--models", "tiny-336"], "timm", "bench"),
        (
            ["export", "eva02-tiny-p14_in21k-pre_3rdparty_in1k", "--format", "onnx", "--out", "OUT/m.onnx"],
            "onnxscript",
            "export",
        ),
    ],
)
def test_missing_extra_is_one_line_exit_2(argv, hidden, extra, hide, tmp_path, capsys) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0, "lr": 0.1}\n')
    argv = [a.replace("WD", str(wd)).replace("OUT", str(tmp_path)) for a in argv]
    hide(hidden)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'eva02[{extra}]'" in err[0], err
    assert not list(tmp_path.glob("*.onnx"))


def test_list_into_a_closed_pipe_is_quiet() -> None:
    code = "import sys; from eva02.cli import main; sys.exit(main(['list']))"
    p = subprocess.run(f'{sys.executable} -c "{code}" | head -n 1', shell=True, capture_output=True, text=True)
    assert p.stdout.count("\n") == 1 and "Traceback" not in p.stderr and p.stderr == ""
