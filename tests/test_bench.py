"""Functional checks of the benchmark harness (`benchmarks/eva02_bench`) on the tiny 'test' size (never speed
assertions), of the `eva02 bench` front to it, and that the installed package never imports timm or mmpretrain."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import eva02.cli.bench as cli_bench
from eva02.cli import main
from eva02.model.vit import Eva02

bench = cli_bench.load_harness()  # benchmarks/eva02_bench of this checkout, as `eva02 bench` finds it

ROOT = Path(__file__).resolve().parents[1]
HAVE_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="timm is the benchmark's reference")
PEERS = ("timm", "mmpretrain", "mmengine")


# ------------------------------------------------------------------------ the package stays free of its peers
def test_importing_the_package_loads_no_peer_library():
    code = (
        "import sys, eva02, eva02.cli, eva02.inference, eva02.export, eva02.engine.train\n"
        "from eva02.cli import build_parser\n"
        "build_parser()  # every command module, bench included\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {'timm', 'mmpretrain', 'mmengine', "
        "'eva02_bench'})))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [], f"imported by the package: {r.stdout.strip()}"


def test_no_file_of_the_package_imports_a_peer_library():
    pattern = re.compile(
        rf"^\s*(import|from)\s+({'|'.join(PEERS)})\b"  # import timm / from timm.models import ...
        rf"|(import_module|__import__|need)\(\s*['\"]({'|'.join(PEERS)})\b",  # by name, at run time
        re.M,
    )
    files = sorted((ROOT / "eva02").rglob("*.py"))
    assert len(files) > 20  # the package really was walked
    found = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in files for m in pattern.finditer(p.read_text())]
    assert found == []
    assert pattern.search("    from timm.models.eva import Eva") and pattern.search('need("mmpretrain", "x", "y")')
    assert not pattern.search("# timm's key layout") and not pattern.search("import timmy")


def test_the_harness_lives_outside_the_package():
    assert not (ROOT / "eva02" / "bench.py").exists()
    assert Path(bench.__file__).resolve().parent == ROOT / "benchmarks" / "eva02_bench"
    assert importlib.util.find_spec("eva02.bench") is None


def test_cli_bench_outside_a_checkout_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli_bench, "HARNESS_DIR", tmp_path / "benchmarks")  # an installed wheel has none
    out = tmp_path / "r.json"
    assert main(["bench", "--models", "test-56", "--impls", "ours", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eva02 bench: error: ") and "python benchmarks/compare.py" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- the harness
def test_time_interleaved_rotates_order_and_counts_rounds():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    times = bench.time_interleaved(fns, rounds=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    with pytest.raises(ValueError, match="rounds"):
        bench.time_interleaved(fns, rounds=0)


def test_time_interleaved_records_a_failing_function_and_keeps_the_rest():
    def broken():
        raise RuntimeError("no kernel for this dtype\nsecond line")

    errors: dict[str, str] = {}
    times = bench.time_interleaved({"ok": lambda: None, "bad": broken}, rounds=2, warmup=1, errors=errors)
    assert list(times) == ["ok"] and len(times["ok"]) == 2
    assert errors == {"bad": "RuntimeError: no kernel for this dtype"}
    with pytest.raises(RuntimeError):
        bench.time_interleaved({"bad": broken}, rounds=1)


def test_forward_flops_matches_flop_counter_plus_attention():
    cfg = bench.SIZES["test-56"].config()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        Eva02(cfg).eval()(torch.randn(1, 3, 56, 56))
    T = cfg.grid**2 + 1
    attention = cfg.depth * 2 * (2 * T * T * cfg.dim)  # q k^T and attn v: the counter skips CPU SDPA
    assert bench.forward_flops(cfg) == fc.get_total_flops() + attention


def test_unknown_size_and_impl_are_clear_errors():
    with pytest.raises(ValueError, match="tiny-336"):
        bench.get_size("tiny-224")
    with pytest.raises(ValueError, match="unknown implementation"):
        bench.build_model("jax", bench.SIZES["test-56"].config())


@needs_timm
def test_timm_twin_has_the_same_architecture():
    cfg = bench.SIZES["test-56"].config()
    ours, theirs = Eva02(cfg), bench.build_timm(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    if bench.load_timm_weights(ours, theirs):  # converter present: same numbers too
        x = torch.randn(2, 3, 56, 56)
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), atol=1e-4, rtol=1e-4)


@needs_timm
def test_bench_size_keys_and_ratios_from_measured_numbers():
    res = bench.bench_size(bench.SIZES["test-56"], ("ours", "timm"), rounds=2, warmup=1, train=True)
    for mode in ("infer", "train"):
        assert set(res[mode]) == {"ours", "timm"}
        for e in res[mode].values():
            assert len(e["times_s"]) == 2 and e["img_s"] > 0
            med = sorted(e["times_s"])[0] / 2 + sorted(e["times_s"])[1] / 2
            assert e["img_s"] == pytest.approx(res["batch"] / med)
    if res["timm_parity_max_abs"] is not None:
        assert res["timm_parity_max_abs"] < 1e-4
    peak = 1e11
    bench.add_derived(res, peak)
    for mode, factor in (("infer", 1), ("train", 3)):
        ours, timm = res[mode]["ours"], res[mode]["timm"]
        assert ours["x_timm"] == pytest.approx(ours["img_s"] / timm["img_s"])
        assert ours["x_timm_best"] == pytest.approx(min(timm["times_s"]) / min(ours["times_s"]))
        assert "x_timm" not in timm
        assert ours["peak_fraction"] == pytest.approx(ours["img_s"] * res["gflop_per_img"] * 1e9 * factor / peak)


def test_memory_ratios_pair_checkpointed_runs():
    res = {
        "gflop_per_img": 1.0,
        "memory": {
            "ours": {"peak_mib": 50.0, "activations_mib": 40.0},
            "timm": {"peak_mib": 100.0, "activations_mib": 80.0},
            "ours+ckpt": {"peak_mib": 20.0, "activations_mib": 10.0},
            "timm+ckpt": {"peak_mib": 40.0, "activations_mib": 20.0},
        },
    }
    mem = bench.add_derived(res, 1e9)["memory"]
    assert mem["ours"]["x_timm_peak"] == 0.5
    assert mem["ours+ckpt"]["x_timm_peak"] == 0.5  # against timm with checkpointing, not without
    assert mem["ours+ckpt"]["ckpt_activation_ratio"] == 0.25
    assert mem["timm+ckpt"]["ckpt_activation_ratio"] == 0.25
    assert "x_timm_peak" not in mem["timm"]


@pytest.mark.slow  # a benchmark rehearsal: a fresh interpreter measures a training step's memory
def test_measure_memory_in_a_subprocess():
    m = bench.measure_memory("ours", bench.SIZES["test-56"], train=True, batch=8, threads=1)
    assert set(m) == {"base_mib", "activations_mib", "peak_mib"}
    assert m["base_mib"] > 10  # the interpreter with torch loaded
    assert m["peak_mib"] >= m["activations_mib"] >= 0
    with pytest.raises(ValueError, match="unknown implementation"):
        bench.measure_memory("nope", bench.SIZES["test-56"])


@needs_timm
def test_cli_bench_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "--models", "test-56", "--rounds", "2", "--threads", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| test-56 | 2 | ours |" in text and "| test-56 | 2 | timm |" in text
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] == 1 and report["matmul_gflop_s"] > 0
    r = report["results"]["test-56"]["infer"]
    assert r["ours"]["x_timm"] == pytest.approx(r["ours"]["img_s"] / r["timm"]["img_s"])


def test_cli_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--models", "huge-999"]) == 2
    assert "unknown size 'huge-999'" in capsys.readouterr().err
    assert main(["bench", "--models", "test-56", "--dtype", "fp16"]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.slow  # compiles forward and backward: about a minute on a 2-core CPU
def test_compiled_rows_for_inference_and_training():
    res = bench.bench_size(bench.SIZES["test-56"], ("ours",), rounds=1, warmup=1, compile=True, train=True)
    for mode in ("infer", "train"):
        assert set(res[mode]) == {"ours", "ours+compile"}, res[mode]
        assert all(e["img_s"] > 0 and len(e["times_s"]) == 1 for e in res[mode].values())


def _floor_counts(entries) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["kind"]] = counts.get(e["kind"], 0) + e["calls"]
    return counts


@pytest.mark.parametrize("train", [False, True])
def test_kernel_recorder_sees_every_matmul_attention_and_conv(train):
    cfg = bench.SIZES["test-56"].config()
    model = Eva02(cfg)
    x, y = torch.randn(2, 3, 56, 56), torch.randint(0, cfg.num_classes, (2,))
    linears = 4 * cfg.depth + 1  # qkv, proj, w12, w3 per block, and the head
    if train:
        opt = torch.optim.AdamW(model.train().parameters())

        def fn():
            bench.train_step(model, opt, x, y, None)
    else:
        fn = bench.infer_fn(model.eval(), x)
    fn()
    rec = bench.KernelRecorder()
    with rec:
        fn()
    counts = _floor_counts(rec.entries.values())
    # training: every linear's forward plus the gradients of its input and its weight; attention and
    # the patch convolution forward and backward
    assert counts == ({"gemm": 3 * linears, "attention": 2 * cfg.depth, "conv": 2} if train
                      else {"gemm": linears, "attention": cfg.depth, "conv": 1})  # fmt: skip
    with rec:  # a second pass adds calls to the same entries, not new ones
        fn()
    assert _floor_counts(rec.entries.values()) == {k: 2 * v for k, v in counts.items()}
    timed = rec.replay(rounds=1)
    assert all(t["ms"] > 0 and t["total_ms"] == pytest.approx(t["ms"] * t["calls"]) for t in timed)
    assert not any(k.startswith("_") for t in timed for k in t)  # replay arguments are not reported


def test_replayed_kernels_reproduce_the_recorded_results():
    a, b, bias = torch.randn(64, 32), torch.randn(48, 32), torch.randn(48)
    rec = bench.KernelRecorder()
    with rec:
        ref = torch.nn.functional.linear(a, b, bias)
    ((func, args, kwargs),) = [e["_replay"] for e in rec.entries.values()]
    a.zero_()  # the recorder holds copies: later changes to the inputs do not reach the replay
    torch.testing.assert_close(func(*args, **kwargs), ref)


@needs_timm
@pytest.mark.slow  # a benchmark rehearsal: records and replays every kernel of both models
def test_bench_floor_ratios_follow_from_the_measured_times(capsys):
    res = bench.bench_floor(bench.SIZES["test-56"], rounds=1)
    for impl in ("ours", "timm"):
        e = res[impl]
        assert e["floor_ms"] == pytest.approx(e["gemm_ms"] + e["attention_ms"] + e["conv_ms"])
        assert e["floor_ms"] == pytest.approx(sum(k["total_ms"] for k in e["kernels"]))
        assert e["floor_share"] == pytest.approx(e["floor_ms"] / e["measured_ms"])
        assert e["ceiling_x_timm"] == pytest.approx(res["timm"]["measured_ms"] / e["floor_ms"])
    assert res["ours"]["x_timm"] == pytest.approx(res["timm"]["measured_ms"] / res["ours"]["measured_ms"])
    rc = main(["bench", "--models", "test-56", "--rounds", "1", "--threads", "1", "--floor", "--train"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| test-56 | infer | ours |" in text and "| test-56 | train | timm |" in text
    assert main(["bench", "--models", "test-56", "--floor", "--impls", "ours"]) == 2
    assert "keep timm" in capsys.readouterr().err
    bf16 = bench.bench_floor(bench.SIZES["test-56"], rounds=1, dtype="bf16", train=True)
    assert bf16["dtype"] == "bf16" and bf16["ours"]["floor_ms"] > 0
    # under bf16 autocast the products run in bf16 (the recorder sees the kernels actually called)
    assert {k["dtype"] for k in bf16["ours"]["kernels"] if k["kind"] == "gemm"} == {"bfloat16"}
    fp32 = res["ours"]["kernels"]
    assert {k["dtype"] for k in fp32 if k["kind"] == "gemm"} == {"float32"}


@needs_timm
def test_cli_bench_bf16_on_cpu(capsys):
    rc = main(["bench", "--models", "test-56", "--rounds", "1", "--threads", "1", "--dtype", "bf16", "--train"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "bf16" in out and "| test-56 | 2 | ours |" in out and "error" not in out
