"""GPU check and benchmark: bf16 numerics, SDPA flash, torch.compile and FSDP2 on one CUDA device.

Runs ours and timm side by side on the same GPU in one process (timm is the reference implementation):
- fp32 and bf16 parity of ours vs timm with identical random weights, and fp32 training gradients;
- that our attention runs under the flash-attention SDPA backend in bf16;
- inference img/s (bf16 weights, eager and torch.compile) and MFU against a bf16 matmul measured here;
- a bf16-autocast training step (forward + backward + AdamW) img/s and peak memory;
- FSDP2 (`fully_shard` per block) on a one-process group: one step, loss equal to the unsharded model's;
- small-336 bf16 kernel floor (GEMMs, attention, conv replayed alone) of ours and timm;
- small-336 compiled bf16, ours vs timm, with the top CUDA kernels of each, the summed kernel time per
  call against the wall time per call, ours with out-of-place residual sums as an A/B, and the code
  inductor generates for 2-block models of both (files beside the JSON);
- compiled bf16 inference of the remaining sizes (tiny, large), ours vs timm, while `BUDGET_S` (seconds
  since start, default unlimited) allows: compilations cost device time;
- the EVA-02-CLIP inference shortcuts against full forwards (fp32, bf16) and uint8 batches normalised on
  the device against the CPU's normalisation;
- train JPEGs decoded on the device (`data.decode_on_device`, nvJPEG) against the workers' CPU decoding: time
  per batch, worker CPU time per image either way, pixel differences.
Writes a JSON file (argument 1, default gpu_results.json). Usage: python benchmarks/gpu_check.py OUT.json
`SECTIONS=small_compiled_profile,compiled_rest` runs only the named sections, in that order.

`DEVICE=cpu` rehearses every section on the CPU with 2-block models at 56 px and small batches (gloo
instead of nccl, CPU kernels in the profile table): it catches errors in this script before a GPU slot
is spent on it. Its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

from eva02.flops import count_flops
from eva02.model import VARIANTS, Eva02
from eva02.weights.convert import to_ours

RESULTS: dict = {}
BUDGET_S = float(os.environ.get("BUDGET_S", "inf"))  # optional sections are skipped past this
T_START = time.time()
OUT_PATH = sys.argv[1] if len(sys.argv) > 1 else "gpu_results.json"
DEV = os.environ.get("DEVICE", "cuda")
DRY = DEV == "cpu"  # the CPU rehearsal: tiny shapes, same code paths
TIMM_NAMES = {
    "tiny": "eva02_tiny_patch14_336",
    "small": "eva02_small_patch14_336",
    "base": "eva02_base_patch14_448",
    "large": "eva02_large_patch14_448",
}


def pair(size: str, img: int, depth: int | None = None):
    """Ours and timm (eval, on DEV) with the same random weights; `depth` cuts both to that many blocks."""
    import timm

    small = {"img_size": 56, "depth": 2} if DRY else {"img_size": img}
    if depth is not None:
        small["depth"] = depth
    cfg = VARIANTS[size].replace(num_classes=1000, **small)
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAMES[size], pretrained=False, num_classes=1000, **small)
    ours = Eva02(cfg)
    ours.load_state_dict(to_ours(ref.state_dict(), "timm", cfg))
    return ours.to(DEV).eval(), ref.to(DEV).eval(), cfg


def batch(n: int) -> int:
    return 2 if DRY else n


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    if DRY:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def matmul_peak() -> float:
    n = 512 if DRY else 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    sec = timed(lambda: a @ b, 20)
    return 2 * n**3 / sec


def save() -> None:
    with open(OUT_PATH, "w") as f:
        json.dump(RESULTS, f, indent=1)


def section(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.time()
            try:
                RESULTS[name] = fn(*a, **k)
            except Exception as e:  # record and continue: one failing check must not hide the others
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            print(f"[{name}] {time.time() - t0:.1f}s {json.dumps(RESULTS[name])[:600]}", flush=True)
            save()  # after every section, so a time-out still leaves results

        return run

    return wrap


@section("parity")
def check_parity():
    out = {}
    for size, img in (("tiny", 336), ("base", 448)):
        ours, ref, cfg = pair(size, img)
        x = torch.randn(batch(4), 3, cfg.img_size, cfg.img_size, device=DEV)
        with torch.inference_mode():
            out[f"{size}_fp32_max_abs"] = (ours(x) - ref(x)).abs().max().item()
            with torch.autocast(DEV, dtype=torch.bfloat16):
                a, b = ours(x).float(), ref(x).float()
            out[f"{size}_bf16_autocast_max_abs"] = (a - b).abs().max().item()
            out[f"{size}_bf16_top1_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return out


@section("train_grad_parity")
def check_train_grads():
    """fp32 training gradients of ours (its hand-written RoPE/split and gate backwards) vs timm's autograd."""
    out = {}
    for size, img in (("tiny", 336), ("base", 448)):
        ours, ref, cfg = pair(size, img)
        x = torch.randn(2, 3, cfg.img_size, cfg.img_size, device=DEV)
        y = torch.randint(0, 1000, (2,), device=DEV)
        for m in (ours, ref):
            m.train()
            torch.nn.functional.cross_entropy(m(x), y).backward()
        theirs = to_ours({n: p.grad for n, p in ref.named_parameters()}, "timm", cfg)
        diffs = {n: (p.grad - theirs[n]).abs().max().item() for n, p in ours.named_parameters()}
        worst = max(diffs, key=diffs.get)
        out[size] = {"max_abs_grad_diff": diffs[worst], "worst_param": worst}
        del ours, ref
    return out


def kernel_table(fn, rows: int = 14) -> dict:
    """Top CUDA kernels of one call of `fn` by total device time (torch.profiler), with the number of
    kernel launches and their summed device time: against the wall time per call, the time the GPU
    waited for the host (launch-bound) or for nothing (kernel-bound)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU if DRY else ProfilerActivity.CUDA]) as prof:
        fn()
        if not DRY:
            torch.cuda.synchronize()
    sort = "self_cpu_time_total" if DRY else "device_time_total"
    avg = prof.key_averages()
    table = avg.table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    if DRY:
        kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
        total_us = sum(e.self_cpu_time_total for e in avg)
    else:
        kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.self_device_time_total for e in avg)
    return {"launches": len(kern), "kernel_ms": total_us / 1000, "table": table.splitlines()}


def over_budget() -> bool:
    return time.time() - T_START > BUDGET_S


def _residual_out_of_place(model) -> None:
    """Give every block the plain `x = x + branch(x)` form (no in-place residual add), for an A/B."""
    for blk in model.blocks:

        def forward(x, rope, path=None, windows=None, *, blk=blk):  # the reference block's maths, any form
            assert windows is None, "the out-of-place A/B is for global attention"
            x = x + blk.attn(blk.norm1(x), rope)
            return x + blk.mlp(blk.norm2(x))

        blk.forward = forward


@section("small_compiled_profile")
def profile_small_compiled():
    """small-336 compiled bf16, ours vs timm: img/s and the kernels behind any gap.

    `ours_residual_out_of_place` is ours with timm's out-of-place residual sums (A/B of the in-place
    form under inductor). The generated code of 2-block models of both is written beside the JSON."""
    from torch._inductor.utils import run_and_get_code

    ours, ref, cfg = pair("small", 336)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    bs = batch(32)
    x = torch.randn(bs, 3, cfg.img_size, cfg.img_size, device=DEV, dtype=torch.bfloat16)
    row = {"batch": bs}
    variants = [("ours", torch.compile(ours)), ("timm", torch.compile(ref))]
    if not over_budget():
        alt = pair("small", 336)[0].to(torch.bfloat16)
        _residual_out_of_place(alt)
        variants.append(("ours_residual_out_of_place", torch.compile(alt)))
    for name, m in variants:
        with torch.inference_mode():
            first = first_call(m, x)
            secs = [timed(lambda m=m: m(x), 20) for _ in range(3)]
            sec = min(secs)
            row[name] = {"img_s": bs / sec, "wall_ms": 1000 * sec, "rounds_ms": [1000 * v for v in secs],
                         "first_call_s": first, "kernels": kernel_table(lambda m=m: m(x))}  # fmt: skip
    # interleave two more passes of each, so a clock change between models shows as a spread
    with torch.inference_mode():
        for _ in range(2):
            for name, m in variants:
                row[name].setdefault("again_img_s", []).append(bs / timed(lambda m=m: m(x), 20))
    best = {name: max(row[name]["again_img_s"]) for name, _ in variants}
    row["ratio"] = row["ours"]["img_s"] / row["timm"]["img_s"]
    row["ratio_again"] = best["ours"] / best["timm"]
    del variants
    two_blocks = pair("small", 336, depth=2)[:2]
    for name, m in zip(("ours", "timm"), two_blocks, strict=True):  # the code inductor writes, to compare
        m = m.to(torch.bfloat16)
        with torch.inference_mode():
            _, code = run_and_get_code(torch.compile(m), x)
        with open(os.path.join(os.path.dirname(os.path.abspath(OUT_PATH)), f"{name}_small_code.py"), "w") as f:
            f.write("\n\n".join(code))
    return row


@section("small_floor")
def floor_small():
    """small-336 bf16: the unavoidable kernels (GEMMs, flash attention, conv) of ours and timm replayed
    alone and summed (eva02_bench.bench_floor); compare with the compiled img/s of small_compiled_profile."""
    import eva02_bench as bench

    size = bench.SIZES["test-56" if DRY else "small-336"]
    res = bench.bench_floor(size, ("ours", "timm"), rounds=10, batch=batch(32), device=DEV, dtype="bf16")
    for impl in ("ours", "timm"):
        res[impl]["kernels"] = [
            {k: e[k] for k in ("kind", "args", "calls", "ms")} for e in res[impl]["kernels"][:8]
        ]  # the largest kernels only
    return res


@section("sdpa_flash")
def check_flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ours, _, cfg = pair("base", 448)
    ours = ours.to(torch.bfloat16)
    x = torch.randn(batch(8), 3, cfg.img_size, cfg.img_size, device=DEV, dtype=torch.bfloat16)
    with torch.inference_mode():
        y_any = ours(x).float()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            y_flash = ours(x).float()
    return {"flash_runs": True, "max_abs_vs_default_backend": (y_flash - y_any).abs().max().item()}


@section("inference_bf16")
def bench_inference(peak: float):
    rows = {}
    sizes = (("tiny", 336, 256), ("small", 336, 128), ("base", 448, 64), ("large", 448, 32))
    for size, img, bs in sizes:
        ours, ref, cfg = pair(size, img)
        ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
        bs = batch(bs)
        x = torch.randn(bs, 3, cfg.img_size, cfg.img_size, device=DEV, dtype=torch.bfloat16)
        macs = count_flops(cfg)
        row = {"batch": bs}
        variants = [("ours_eager", ours), ("timm_eager", ref)]
        if size == "base":  # the headline size here; the others in `compiled_rest`, if time allows
            variants += [("ours_compile", torch.compile(ours)), ("timm_compile", torch.compile(ref))]
        for name, m in variants:
            with torch.inference_mode():
                first = first_call(m, x)
                sec = timed(lambda m=m, x=x: m(x), 10)
            row[name] = {"img_s": bs / sec, "mfu": 2 * macs * bs / sec / peak, "first_call_s": first}
        row["ratio_eager"] = row["ours_eager"]["img_s"] / row["timm_eager"]["img_s"]
        if "timm_compile" in row:
            row["ratio_compile"] = row["ours_compile"]["img_s"] / row["timm_compile"]["img_s"]
        rows[f"{size}-{img}"] = row
        del ours, ref
        empty_cache()
    return rows


@section("train_bf16")
def bench_train():
    rows = {}
    for size, img, bs in (("base", 448, 32),):
        ours, ref, cfg = pair(size, img)
        bs = batch(bs)
        x = torch.randn(bs, 3, cfg.img_size, cfg.img_size, device=DEV)
        y = torch.randint(0, 1000, (bs,), device=DEV)
        row = {"batch": bs}
        for name, m in (("ours", ours), ("timm", ref)):
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

            def step(m=m, opt=opt, x=x, y=y):
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            reset_peak()
            sec = timed(step, 5)
            row[name] = {"img_s": bs / sec, "peak_mem_gib": peak_gib()}
            if name == "ours":
                m.set_grad_checkpointing(True)
                reset_peak()
                sec = timed(step, 3)
                row["ours_grad_ckpt"] = {"img_s": bs / sec, "peak_mem_gib": peak_gib()}
            del opt
        row["ratio"] = row["ours"]["img_s"] / row["timm"]["img_s"]
        rows[f"{size}-{img}"] = row
    return rows


@section("compiled_rest")
def bench_compiled_rest(peak: float):
    """Compiled bf16 inference of tiny-336 and large-448 (batch 32, as the earlier GPU table), ours vs
    timm, each compiled model measured in two interleaved passes; skipped past BUDGET_S."""
    rows = {}
    for size, img in (("tiny", 336), ("large", 448)):
        if over_budget():
            rows[f"{size}-{img}"] = "skipped: over BUDGET_S"
            continue
        ours, ref, cfg = pair(size, img)
        ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
        bs = batch(32)
        x = torch.randn(bs, 3, cfg.img_size, cfg.img_size, device=DEV, dtype=torch.bfloat16)
        macs = count_flops(cfg)
        fns = {"ours": torch.compile(ours), "timm": torch.compile(ref)}
        row = {"batch": bs}
        with torch.inference_mode():
            for name, m in fns.items():
                row[name] = {"first_call_s": first_call(m, x), "img_s": []}
            for _ in range(2):
                for name, m in fns.items():
                    row[name]["img_s"].append(bs / timed(lambda m=m, x=x: m(x), 20))
        for name in fns:
            best = max(row[name]["img_s"])
            row[name]["mfu"] = 2 * macs * best / peak
        row["ratio"] = max(row["ours"]["img_s"]) / max(row["timm"]["img_s"])
        rows[f"{size}-{img}"] = row
        RESULTS["compiled_rest"] = {**rows, "partial": True}  # kept if the next size runs out of time
        save()
        del ours, ref, fns
        empty_cache()
    return rows


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def first_call(m, x) -> float:
    """Seconds of the first call of `m` (for a compiled model: compilation included)."""
    t0 = time.time()
    m(x)
    sync()
    return time.time() - t0


def empty_cache() -> None:
    if not DRY:
        torch.cuda.empty_cache()


def reset_peak() -> None:
    if not DRY:
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return None if DRY else torch.cuda.max_memory_allocated() / 2**30


@section("fsdp2")
def check_fsdp2():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free port: the machine may run other jobs
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("gloo" if DRY else "nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = VARIANTS["base"].replace(img_size=56 if DRY else 224, num_classes=1000, depth=4)
        plain = Eva02(cfg).to(DEV).train()
        sharded = Eva02(cfg).to(DEV).train()
        sharded.load_state_dict(plain.state_dict())
        from eva02.engine.parallel import apply_fsdp  # the engine's own FSDP2 wrapping

        sharded = apply_fsdp(sharded, torch.bfloat16)  # bf16 params for compute, fp32 gradient reduction
        x = torch.randn(batch(8), 3, cfg.img_size, cfg.img_size, device=DEV)
        y = torch.randint(0, 1000, (x.shape[0],), device=DEV)
        losses = {}
        for name, m in (("plain", plain), ("fsdp2", sharded)):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            seq = []
            for _ in range(3):
                # both under bf16 autocast, as the engine trains; FSDP2 also gathers bf16 parameters
                # (its policy does not cast block inputs: the RoPE tables stay fp32)
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                seq.append(loss.item())
            losses[name] = seq
        dtypes = sorted({str(type(p).__name__) for p in sharded.parameters()})
        return {
            "param_types": dtypes,
            "losses": losses,
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["plain"], losses["fsdp2"], strict=True)),
        }
    finally:
        dist.destroy_process_group()


@section("clip_and_input_paths")
def check_clip_and_input():
    """The inference shortcuts of the CLIP towers (class token alone in the last image block; text cut
    after the last end-of-text token) against full forwards, fp32 and bf16 weights; a uint8 batch
    normalised on the device (`data.device_normalize`) against the CPU's normalisation."""
    from eva02.engine.loader import DeviceNormalize
    from eva02.model import fast
    from eva02.model.clip import CLIP_VARIANTS, Eva02Clip

    out = {}
    torch.manual_seed(0)
    model = Eva02Clip(CLIP_VARIANTS["test" if DRY else "B-16"]).to(DEV).eval()
    n, ctx = model.cfg.vision.img_size, model.cfg.text.context_length
    x = torch.randn(batch(8), 3, n, n, device=DEV)
    ids = torch.zeros(batch(8), ctx, dtype=torch.long, device=DEV)
    for i in range(ids.shape[0]):  # texts of 3..ctx tokens, end-of-text (highest id) last
        k = 3 + (i * 7) % (ctx - 3)
        ids[i, : k - 1] = torch.randint(1, model.cfg.text.vocab_size - 1, (k - 1,), device=DEV)
        ids[i, k - 1] = model.cfg.text.vocab_size - 1
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        with torch.inference_mode():
            short = m.encode_image(x.to(dtype)).float()
            with fast.use(None):
                full = m.encode_image(x.to(dtype)).float()
            t_short = m.encode_text(ids).float()
            tokens = m.text.forward_tokens(ids)
            t_full = (tokens[torch.arange(ids.shape[0], device=DEV), ids.argmax(-1)] @ m.text.proj).float()
        tag = str(dtype).split(".")[-1]
        out[f"image_{tag}_max_abs"] = (short - full).abs().max().item()
        out[f"text_{tag}_max_abs"] = (t_short - t_full).abs().max().item()
    u8 = torch.randint(0, 256, (batch(8), 3, 64, 64), dtype=torch.uint8)
    norm = DeviceNormalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    on_cpu = norm({"images": u8})["images"]
    on_dev = norm({"images": u8.to(DEV)})["images"].cpu()
    out["device_normalize_max_abs"] = (on_cpu - on_dev).abs().max().item()
    return out


@section("decode_on_device")
def bench_decode_on_device():
    """`data.decode_on_device`: a batch of ImageNet-sized JPEGs decoded (one batched nvJPEG call), cropped, resized
    and normalised on the device, against the workers' CPU path (the fast transform, one thread as in a
    DataLoader worker), and what a worker still does (header, crop and flip draws, packing); the device's pixels
    against the same plans decoded on the CPU (libjpeg-turbo)."""
    import io

    import numpy as np
    from PIL import Image

    from eva02.data.device_decode import DeviceDecodeTransform, decode_batch, stack_images
    from eva02.data.fast_transforms import FastTrainTransform
    from eva02.data.images import decode_image, deferred_jpeg_decoding
    from eva02.engine.loader import DeviceNormalize

    n, size, (h, w) = (8, 32, (90, 120)) if DRY else (256, 224, (375, 500))
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):  # waves and grain: JPEGs of a photo's size (~50-100 kB at 500x375)
        waves = [128 + 90 * np.sin(x / (5 + i % 7) + i), 128 + 90 * np.cos(y / (4 + i % 5)), (x + y + 9 * i) % 256]
        a = np.stack(waves, -1)
        a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        files.append(buf.getvalue())
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    kw = dict(mean=mean, std=std, randaug_n=0)

    def worker(tf) -> tuple[list, float]:  # (outputs, CPU seconds per image) of one worker thread
        out, t0 = [], time.process_time()
        for i, data in enumerate(files):
            torch.manual_seed(i)
            with deferred_jpeg_decoding():
                img = decode_image(data, f"bench_{i}.jpg")
            out.append(tf(img))
        stack_images(out)  # the worker's collate
        return out, (time.process_time() - t0) / n

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, cpu_full = worker(FastTrainTransform(size, normalize=False, **kw))
        _, cpu_full_noreduce = worker(FastTrainTransform(size, normalize=False, reduced_decode=False, **kw))
        items, cpu_plan = worker(DeviceDecodeTransform(FastTrainTransform(size, **kw)))
    finally:
        torch.set_num_threads(threads)
    batch = stack_images(items)
    host = batch if DRY else batch.pin_memory()
    norm = DeviceNormalize(mean, std, torch.bfloat16)
    t_dev = timed(lambda: norm({"images": host.to(DEV, non_blocking=True)})["images"], 2 if DRY else 10)
    if not DRY:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    got = decode_batch(host.to(DEV)).cpu()
    peak = 0 if DRY else (torch.cuda.max_memory_allocated() - before) / 2**20
    diff = (got - decode_batch(batch)).abs()
    return {
        "images": n, "jpeg_kb_mean": sum(map(len, files)) / n / 1024, "size": size, "source_hw": [h, w],
        "worker_cpu_ms_per_image_fast_transform": cpu_full * 1e3,
        "worker_cpu_ms_per_image_fast_full_size_decode": cpu_full_noreduce * 1e3,
        "worker_cpu_ms_per_image_decode_on_device": cpu_plan * 1e3,
        "device_ms_per_batch": t_dev * 1e3, "device_img_s": n / t_dev,
        "worker_cores_matching_the_device": (n / t_dev) * cpu_full,  # single-thread workers for the same img/s
        "device_peak_mib": peak,
        "pixels_vs_cpu_mean_abs": diff.mean().item(), "pixels_vs_cpu_max_abs": diff.max().item(),
    }  # fmt: skip


SECTIONS = {
    "parity": lambda peak: check_parity(),
    "train_grad_parity": lambda peak: check_train_grads(),
    "sdpa_flash": lambda peak: check_flash(),
    "inference_bf16": bench_inference,
    "train_bf16": lambda peak: bench_train(),
    "fsdp2": lambda peak: check_fsdp2(),
    "small_floor": lambda peak: floor_small(),
    "small_compiled_profile": lambda peak: profile_small_compiled(),
    "compiled_rest": bench_compiled_rest,
    "clip_and_input": lambda peak: check_clip_and_input(),
    "decode_on_device": lambda peak: bench_decode_on_device(),
}


def main() -> None:
    import timm

    gpu = "none (CPU rehearsal)" if DRY else torch.cuda.get_device_properties(0).name
    RESULTS["env"] = {"gpu": gpu, "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda}
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak()
    RESULTS["bf16_matmul_peak_tflops"] = peak / 1e12
    print("peak", peak / 1e12, flush=True)
    chosen = os.environ.get("SECTIONS", ",".join(SECTIONS)).split(",")  # SECTIONS=a,b: these only
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown SECTIONS {unknown}; choose from {', '.join(SECTIONS)}")
    for name in chosen:
        SECTIONS[name](peak)


if __name__ == "__main__":
    main()
