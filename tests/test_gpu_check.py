"""The GPU check script rehearsed on the CPU: every section must run without error before a GPU slot is spent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a rehearsal of every section: minutes on a 2-core CPU
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="the script compares against timm")
def test_gpu_check_rehearsal_on_cpu_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "DEVICE": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    sections = {"parity", "train_grad_parity", "sdpa_flash", "inference_bf16", "train_bf16", "fsdp2",
                "small_floor", "small_compiled_profile", "compiled_rest", "decode_on_device"}  # fmt: skip
    assert sections <= set(res)
    errors = {k: res[k]["trace"] for k in sections if "error" in res[k]}
    assert not errors, errors
    assert res["parity"]["tiny_fp32_max_abs"] < 1e-4 and res["parity"]["base_bf16_top1_agree"] == 1.0
    assert res["train_grad_parity"]["base"]["max_abs_grad_diff"] < 1e-4
    assert res["fsdp2"]["param_types"] == ["DTensor"] and res["fsdp2"]["max_abs_loss_diff"] < 1e-2
    assert res["inference_bf16"]["base-448"]["ratio_compile"] > 0
    prof = res["small_compiled_profile"]
    assert prof["ours"]["kernels"]["table"] and prof["ours"]["kernels"]["launches"] > 0
    assert prof["ours_residual_out_of_place"]["img_s"] > 0 and prof["ratio"] > 0
    assert res["compiled_rest"]["large-448"]["ratio"] > 0 and "partial" not in res["compiled_rest"]
    assert (tmp_path / "ours_small_code.py").stat().st_size > 0 and (tmp_path / "timm_small_code.py").exists()
    assert set(res["inference_bf16"]) == {"tiny-336", "small-336", "base-448", "large-448"}
    assert res["small_floor"]["ours"]["floor_ms"] > 0 and res["small_floor"]["timm"]["kernels"]
    dec = res["decode_on_device"]  # on the CPU both sides are libjpeg-turbo: the same pixels
    assert dec["device_img_s"] > 0 and dec["worker_cpu_ms_per_image_decode_on_device"] > 0
    assert dec["pixels_vs_cpu_max_abs"] == 0
