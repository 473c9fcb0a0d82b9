"""The model zoo: names, aliases, configs, sources, exact parameter counts, `eva02 list/info`, zoo table."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from eva02.cli import main
from eva02.flops import count_flops, count_params, mmpretrain_params
from eva02.weights.zoo import ALIASES, ZOO, list_models, resolve

ROOT = Path(__file__).resolve().parents[1]

# The reference page's three tables, in order (the stray leading space of the base-p16 name removed).
PAGE_NAMES = [
    "eva02-tiny-p14_in21k-pre_3rdparty_in21k",
    "eva02-small-p14_in21k-pre_3rdparty_in21k",
    "eva02-base-p14_in21k-pre_3rdparty_in21k",
    "eva02-base-p16_in21k-pre_3rdparty_in21k",
    "eva02-large-p14_in21k-pre_3rdparty_in21k",
    "eva02-large-p16_in21k-pre_3rdparty_in21k",
    "eva02-large-p14_m38m-pre_3rdparty_m38m",
    "eva02-large-p16_m38m-pre_3rdparty_m38m",
    "eva02-tiny-p14_in21k-pre_3rdparty_in1k",
    "eva02-small-p14_in21k-pre_3rdparty_in1k",
    "eva02-base-p14_in21k-pre_3rdparty_in1k",
    "eva02-large-p14_in21k-pre_3rdparty_in1k",
    "eva02-large-p14_m38m-pre_3rdparty_in1k",
    "eva02-base-p14_in21k-pre_in21k-medft_3rdparty_in1k",
    "eva02-large-p14_in21k-pre_in21k-medft_3rdparty_in1k",
    "eva02-large-p14_m38m-pre_in21k-medft_3rdparty_in1k",
]

# Parameter counts of the official / timm models (timm.create_model(...).num_params); the p16 counts are
# the p14 ones with a 16x16 kernel (+ 180 * D) and a 14x14 position grid (- 60 * D).
EXACT_PARAMS = {
    ("tiny", 0): 5_502_144,
    ("small", 0): 21_621_120,
    ("base", 0): 85_758_720,
    ("large", 0): 303_268_800,
    ("tiny", 1000): 5_756_584,
    ("small", 1000): 22_129_000,
    ("base", 1000): 87_117_544,
    ("large", 1000): 305_080_232,
}
DIMS = {192: "tiny", 384: "small", 768: "base", 1024: "large"}


def test_zoo_holds_exactly_the_page_names_in_page_order():
    assert list(ZOO) == PAGE_NAMES
    assert list_models() == PAGE_NAMES


@pytest.mark.parametrize("name", PAGE_NAMES)
def test_entry_config_matches_its_name(name):
    e = ZOO[name]
    size = re.match(r"eva02-(tiny|small|base|large)-p(14|16)_", name)
    cfg = e.cfg
    assert DIMS[cfg.dim] == size.group(1)
    assert cfg.patch_size == int(size.group(2))
    headless = name.endswith(("_in21k", "_m38m"))
    assert cfg.num_classes == (0 if headless else 1000)
    assert e.task == ("headless" if headless else "in1k")
    expected_img = 224 if headless else (336 if cfg.dim < 768 else 448)
    assert cfg.img_size == expected_img == e.preprocess.img_size
    assert e.weights_patch_size == (14 if cfg.patch_size == 16 else None)
    assert e.pretrain_data == ("m38m" if "m38m-pre" in name else "in21k")
    assert (e.top1 is None) == headless and (e.top5 is None) == headless
    assert e.preprocess.crop_pct == 1.0 and e.preprocess.interpolation == "bicubic"
    assert e.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


@pytest.mark.parametrize("name", PAGE_NAMES)
def test_exact_parameter_count_on_meta_device(name):
    cfg = ZOO[name].cfg
    expected = EXACT_PARAMS[(DIMS[cfg.dim], cfg.num_classes)]
    if cfg.patch_size == 16:
        expected += 180 * cfg.dim - 60 * cfg.dim
    assert count_params(cfg) == expected


@pytest.mark.parametrize("name", PAGE_NAMES)
def test_page_params_column_is_mmpretrain_counting(name):
    e = ZOO[name]
    mmp = mmpretrain_params(e.cfg) / 1e6
    if name == "eva02-base-p14_in21k-pre_3rdparty_in21k":
        assert e.page_params_m == 85.37 and round(mmp, 2) == 85.77  # the page's typo, documented
    elif name == "eva02-large-p14_in21k-pre_in21k-medft_3rdparty_in1k":
        assert e.page_params_m == 305.08 and round(mmp, 2) == 305.10  # the page disagrees with its metafile
    else:
        assert round(mmp, 2) == e.page_params_m


def test_every_alias_and_name_resolves_case_insensitively():
    n_alias = 0
    for name, e in ZOO.items():
        assert resolve(name) is e
        assert resolve(name.upper()) is e
        assert resolve(f"  {name} ") is e  # the page's stray space
        for a in e.aliases:
            assert resolve(a) is e and resolve(a.upper()) is e
            assert ALIASES[a.lower()] == name
            n_alias += 1
    assert n_alias == len(ALIASES) == 32


def test_known_aliases_point_at_the_right_models():
    assert resolve("eva02_tiny_patch14_336.mim_in22k_ft_in1k").name == "eva02-tiny-p14_in21k-pre_3rdparty_in1k"
    assert resolve("eva02_tiny_patch14_224.mim_in22k").name == "eva02-tiny-p14_in21k-pre_3rdparty_in21k"
    medft = "eva02-base-p14_in21k-pre_in21k-medft_3rdparty_in1k"
    assert resolve("eva02_base_patch14_448.mim_in22k_ft_in22k_in1k").name == medft
    assert resolve("eva02_base_patch14_448").name == medft  # timm's default tag
    assert resolve("vit-tiny-p14_eva02-in21k-pre_3rdparty_in1k-336px").name == "eva02-tiny-p14_in21k-pre_3rdparty_in1k"
    m38m = "eva02-large-p14_m38m-pre_in21k-medft_3rdparty_in1k"
    assert resolve("vit-large-p14_eva02_m38m-pre_in21k-medft_3rdparty_in1k-448px").name == m38m


def test_unknown_name_names_it_and_suggests_three():
    with pytest.raises(ValueError, match="eva02-tiny-p14_in1k") as info:
        resolve("eva02-tiny-p14_in1k")
    closest = info.value.args[0].split("closest: ")[1].split(" (run")[0].split(", ")
    assert len(closest) == 3
    assert all("tiny" in c for c in closest)


def test_list_models_pattern():
    large = list_models("eva02-large*")
    assert len(large) == 8 and all(n.startswith("eva02-large") for n in large)
    assert large == [n for n in PAGE_NAMES if n in large]  # page order
    assert list_models("*M38M*") == [n for n in PAGE_NAMES if "m38m" in n]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name", PAGE_NAMES)
def test_sources_official_then_timm_then_mmpretrain(name):
    e = ZOO[name]
    kinds = [s.kind for s in e.sources]
    assert kinds[:2] == ["official", "timm"]
    assert kinds[2:] in ([], ["mmpretrain"])
    for s in e.sources:
        assert s.url.startswith("https://") and s.url.endswith(s.filename if s.kind != "timm" else "model.safetensors")
        assert s.fmt == s.kind
    off, timm = e.sources[0], e.sources[1]
    assert off.url.startswith("https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/")
    timm_name = timm.filename.removesuffix(".safetensors")
    assert resolve(timm_name).cfg == e.cfg.replace(patch_size=14)  # timm's name with tag resolves (p14 twin)
    if e.cfg.patch_size == 14:
        assert timm_name in e.aliases
    if len(e.sources) == 3:
        mmp = e.sources[2]
        assert mmp.url.startswith("https://download.openmmlab.com/mmpretrain/v1.0/eva02/")
        assert re.fullmatch(r"[0-9a-f]{8}", mmp.sha256_prefix)
        assert mmp.filename.endswith(f"-{mmp.sha256_prefix}.pth")
    else:  # the two direct L fine-tunes are not in mmpretrain's metafile
        assert "large" in name and "medft" not in name and name.endswith("_in1k")


def test_cli_list_json(capsys):
    assert main(["list", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["task"] != "clip"]  # CLIP: test_clip_zoo.py
    assert [r["name"] for r in rows] == PAGE_NAMES
    tiny = rows[PAGE_NAMES.index("eva02-tiny-p14_in21k-pre_3rdparty_in1k")]
    assert tiny["params"] == 5_756_584 and tiny["img_size"] == 336 and tiny["task"] == "in1k"
    assert abs(tiny["flops"] / 1e9 - 4.68) / 4.68 < 0.01
    assert tiny["top1"] == 80.69 and tiny["top5"] == 95.54


def test_cli_list_table_and_pattern(capsys):
    assert main(["list", "eva02-small*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "task", "params"]
    assert [line.split()[0] for line in out[1:3]] == PAGE_NAMES[1:2] + PAGE_NAMES[9:10]
    assert "22.13" in out[2] and "15.48" in out[2] and "85.77" in out[2]
    assert main(["list", "nothing*"]) == 1


def test_cli_info_json(capsys):
    assert main(["info", "EVA02_BASE_PATCH14_448.MIM_IN22K_FT_IN1K", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "eva02-base-p14_in21k-pre_3rdparty_in1k"
    assert info["params"] == 87_117_544 and info["params_mmpretrain"] == 87_126_760
    assert info["flops_mmpretrain"] == 107_105_984_256
    assert info["flops"] == 107_105_984_256 + 768 * 1000  # plus the head, which mmpretrain leaves out
    assert info["config"]["img_size"] == 448 and info["preprocess"]["crop_pct"] == 1.0
    assert [s["kind"] for s in info["sources"]] == ["official", "timm", "mmpretrain"]
    assert info["sources"][2]["sha256_prefix"] == "8ad211c5"
    assert info["page"] == {"params_m": 87.13, "flops_g": 107.11, "top1": 88.29, "top5": 98.53}


def test_cli_info_text_and_img_size(capsys):
    assert main(["info", "eva02-base-p16_in21k-pre_3rdparty_in21k"]) == 0
    out = capsys.readouterr().out
    assert "85,850,880" in out and "patch 14 checkpoints" in out
    assert "https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/pt/eva02_B_pt_in21k_p14.pt" in out
    assert main(["info", "eva02_tiny_patch14_224", "--img-size", "448", "--json"]) == 0
    big = json.loads(capsys.readouterr().out)
    assert big["img_size"] == 448 and big["flops"] == count_flops(ZOO[PAGE_NAMES[0]].cfg.replace(img_size=448))
    assert big["flops"] > 4 * 1.7e9  # four times the tokens: more than four times the MACs


def test_list_counts_by_formula_equal_the_counter():
    """`eva02 list` counts without building models; its formulas must give what the MAC counter counts."""
    from eva02.cli.zoo import arch_macs, arch_params
    from eva02.model.config import VARIANTS

    cfgs = {e.cfg for e in ZOO.values()}
    cfgs |= {
        VARIANTS["test"].replace(num_classes=k, img_size=s, in_chans=c)
        for k in (0, 7)
        for s in (28, 70)
        for c in (1, 3)
    }
    for cfg in cfgs:
        assert (arch_params(cfg), arch_macs(cfg)) == (count_params(cfg), count_flops(cfg)), cfg


def test_cli_errors_are_one_line_exit_2(capsys):
    assert main(["info", "eva02-tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'eva02-tiny'" in err and "closest:" in err
    assert main(["info", "eva02_tiny_patch14_224", "--img-size", "100"]) == 2
    assert "--img-size 100" in capsys.readouterr().err


def _zoo_table():
    spec = importlib.util.spec_from_file_location("zoo_table", ROOT / "tools" / "zoo_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_zoo_table_matches_counts():
    lines = _zoo_table().make_table().splitlines()
    assert len(lines) == 2 + len(ZOO)
    for line, (name, e) in zip(lines[2:], ZOO.items(), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"`{name}`" and cells[1] == e.task
        assert cells[2] == f"{count_params(e.cfg) / 1e6:.2f}"
        assert abs(float(cells[3]) - e.page_flops_g) <= 0.01  # our count rounds to the page's column
        assert cells[4] == f"{e.cfg.img_size}x{e.cfg.img_size}"
        assert cells[5] == ("-" if e.top1 is None else f"{e.top1:.2f}")


def test_zoo_table_write_and_check(tmp_path, capsys, monkeypatch):
    zt = _zoo_table()
    table = zt.make_table()  # made once: its content is checked above, here is the file handling
    monkeypatch.setattr(zt, "make_table", lambda: table)
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{zt.START}\nstale\n{zt.END}\noutro\n")
    assert zt.main(["--check", str(doc)]) == 1
    assert zt.main(["--write", str(doc)]) == 0
    text = doc.read_text()
    assert text == f"intro\n{zt.START}\n{table}\n{zt.END}\noutro\n"
    assert zt.main(["--check", str(doc)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left behind
    doc.write_text("no markers here\n")
    assert zt.main(["--write", str(doc)]) == 2
    assert doc.read_text() == "no markers here\n"
    assert "zoo-table:start" in capsys.readouterr().err


def test_parameter_counts_equal_timm_on_meta_device():
    timm = pytest.importorskip("timm")
    seen = set()
    for e in ZOO.values():
        c = e.cfg
        arch = f"eva02_{DIMS[c.dim]}_patch14_{c.img_size}"
        if (arch, c.patch_size, c.num_classes) in seen:
            continue
        seen.add((arch, c.patch_size, c.num_classes))
        with torch.device("meta"):
            ref = timm.create_model(arch, pretrained=False, num_classes=c.num_classes, patch_size=c.patch_size)
        assert count_params(c) == sum(p.numel() for p in ref.parameters()), e.name
    assert len(seen) == 10
