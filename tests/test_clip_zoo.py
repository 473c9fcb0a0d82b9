"""EVA-02-CLIP in the zoo: counts by formula equal the counters on the modules, names, `list` and `info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eva02.cli import main
from eva02.cli.zoo import arch_macs, arch_params, text_macs, text_params
from eva02.flops import count_clip
from eva02.weights.zoo import ALIASES, CLIP_ZOO, ZOO, find_clip


@pytest.mark.parametrize("name", list(CLIP_ZOO))
def test_formulas_equal_counters(name: str) -> None:
    cfg = CLIP_ZOO[name].cfg
    counted = count_clip(cfg)
    assert arch_params(cfg.vision) == counted["image_params"]
    assert text_params(cfg.text, cfg.embed_dim) == counted["text_params"]
    assert counted["params"] == counted["image_params"] + counted["text_params"] + 1  # logit_scale
    assert arch_macs(cfg.vision) == counted["image_macs"]
    assert text_macs(cfg.text, cfg.embed_dim) == counted["text_macs"]


def test_total_parameters_match_baai_figures() -> None:
    """BAAI's model cards give 149M (B/16), 428M (L/14), 4.7B (E/14) and 5.0B (E/14+) parameters in all."""
    millions = {n: round(count_clip(e.cfg)["params"] / 1e6) for n, e in CLIP_ZOO.items()}
    assert millions["EVA02-CLIP-B-16"] == 150 and millions["EVA02-CLIP-L-14"] == 428
    assert round(millions["EVA02-CLIP-bigE-14"] / 100) == 47 and round(millions["EVA02-CLIP-bigE-14-plus"] / 100) == 50


def test_clip_names_are_apart_from_the_classifiers() -> None:
    classifier_names = {n.lower() for n in ZOO} | set(ALIASES)
    for e in CLIP_ZOO.values():
        assert not {s.lower() for s in (e.name, *e.aliases)} & classifier_names, e.name
        assert find_clip(e.name.upper()) is e


def test_list_and_info(capsys) -> None:
    assert main(["list", "clip"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in CLIP_ZOO) and "74.7" in out and "eva02-tiny" not in out
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows if r["task"] == "clip"] == list(CLIP_ZOO)
    assert len(rows) == len(ZOO) + len(CLIP_ZOO)
    assert main(["list"]) == 0  # both tables, each model once: the classifiers', then the CLIP models'
    lines = capsys.readouterr().out.splitlines()
    named = [line.split()[0] for line in lines if line.split() and line.split()[0] in {*ZOO, *CLIP_ZOO}]
    assert named == [*ZOO, *CLIP_ZOO]
    assert sum(line.startswith("EVA-02-CLIP (") for line in lines) == 1
    assert main(["info", "EVA02-L-14-336", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "EVA02-CLIP-L-14-336" and info["img_size"] == 336 and info["zero_shot_top1"] == 80.4
    assert main(["info", "-m", "EVA02-CLIP-bigE-14"]) == 0
    assert "post-norm" in capsys.readouterr().out


def test_list_still_needs_no_torch() -> None:
    code = "import sys; from eva02.cli import main; main(['list', 'clip']); assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_readme_clip_table_is_current() -> None:
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("zoo_table", root / "tools" / "zoo_table.py")
    zt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zt)
    table = zt.make_clip_table()
    assert table in (root / "README.md").read_text()
    assert len(table.splitlines()) == 2 + len(CLIP_ZOO) and "| 82.0 |" in table
