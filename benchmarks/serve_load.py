"""Loopback load test of `eva02 serve`: throughput and latency with micro-batching against --max-batch 1,
and against the same work done offline (decode, preprocess, model) without HTTP.

For each --max-batch value the script starts `python -m eva02 serve` on a free loopback port, waits
for /readyz, sends a few warm-up requests, then lets --clients threads (one keep-alive connection
each) send --requests classify requests in all, each the same JPEG. It reports images/s, p50/p99
latency, the status codes seen and the mean batch size from /metrics, stops the server with SIGTERM
and waits for it. Everything is bounded: a fixed number of requests, a per-request timeout, and the
server is killed if it does not stop. With more clients than --max-queue, the extra requests must
get 503 (and nothing else): that is the overload check.

    python benchmarks/serve_load.py --random eva02-tiny-p14_in21k-pre_3rdparty_in1k --clients 16 --requests 512
    python benchmarks/serve_load.py --checkpoint model.safetensors --max-batch 32 1 --device cuda
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from eva02.assets import DEMO_IMAGE


def start_server(checkpoint: Path, max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, int, list]:
    """`eva02 serve` on a free loopback port; (process, port, its stderr lines) once /readyz is 200."""
    cmd = [sys.executable, "-m", "eva02", "serve", "--checkpoint", str(checkpoint), "--port", "0",
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(args.max_queue or args.clients), "--timeout-s", str(args.timeout_s)]  # fmt: skip
    for flag in ("device", "dtype", "threads", "decode_threads"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if re.search(r" at http://127\.0\.0\.1:\d+ ", line):
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(args.start_timeout_s):
        stop_server(proc)
        raise SystemExit("the server did not start:\n" + "".join(lines[-20:]))
    port = int(next(m.group(1) for line in lines if (m := re.search(r" at http://127\.0\.0\.1:(\d+) ", line))))
    end = time.monotonic() + args.start_timeout_s
    while get(port, "/readyz")[0] != 200:
        if time.monotonic() > end or proc.poll() is not None:
            stop_server(proc)
            raise SystemExit("the server did not become ready:\n" + "".join(lines[-20:]))
        time.sleep(0.1)
    return proc, port, lines


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM, then kill if it has not stopped within 30 s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        res = conn.getresponse()
        return res.status, res.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def load(port: int, image: bytes, clients: int, requests: int, timeout_s: float) -> dict:
    """`requests` POSTs from `clients` threads; statuses, latencies (s) and wall time."""
    remaining = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        while True:
            with lock:
                if next(remaining, None) is None:
                    break
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/classify", body=image, headers={"Content-Type": "image/jpeg"})
                res = conn.getresponse()
                res.read()
                status = res.status
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
            elapsed = time.perf_counter() - start
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(elapsed)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - start, "latencies": latencies, "statuses": statuses}


def mean_batch(port: int) -> float:
    text = get(port, "/metrics")[1].decode()
    total = sum(float(v) for v in re.findall(r'^eva02_batch_size_sum\{kind="classify"\} (\S+)$', text, re.M))
    count = sum(float(v) for v in re.findall(r'^eva02_batch_size_count\{kind="classify"\} (\S+)$', text, re.M))
    return total / count if count else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def offline_img_s(checkpoint: Path, image: bytes, batch: int, requests: int, args: argparse.Namespace) -> float:
    """The same decode + preprocess + model work in this process, in batches, without HTTP."""
    import torch

    from eva02.inference import load_for_inference
    from eva02.serve.runner import ModelRunner
    from eva02.threads import set_threads

    set_threads(args.threads)
    model, pre = load_for_inference(None, checkpoint=checkpoint, device=args.device)
    runner = ModelRunner(model, pre, name="offline", dtype=args.dtype)
    runner.warm_up()
    done, start = 0, time.perf_counter()
    while done < requests:
        n = min(batch, requests - done)
        runner.run("classify", [runner.decode(image, "x") for _ in range(n)])
        done += n
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return requests / (time.perf_counter() - start)


def random_checkpoint(name: str, folder: Path) -> Path:
    """A random-weight checkpoint of a zoo architecture (no download)."""
    import torch

    from eva02.model.vit import Eva02
    from eva02.weights.load import save_checkpoint
    from eva02.weights.zoo import resolve

    entry = resolve(name)
    torch.manual_seed(0)
    return save_checkpoint(Eva02(entry.cfg), folder / "random.safetensors", name=entry.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="an eva02 checkpoint with a classifier")
    src.add_argument("--random", metavar="NAME", help="random weights of this zoo architecture")
    p.add_argument("--max-batch", type=int, nargs="+", default=[32, 1])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--max-queue", type=int, help="server --max-queue (default: --clients, so nothing is refused)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--threads", type=int)
    p.add_argument("--decode-threads", type=int)
    p.add_argument("--image", type=Path, default=Path(DEMO_IMAGE), help="the JPEG every request sends")
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    image = args.image.read_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(args.random, Path(tmp))
        for max_batch in args.max_batch:
            proc, port, lines = start_server(checkpoint, max_batch, args)
            try:
                load(port, image, min(args.clients, 4), 2 * args.clients, args.timeout_s)  # warm-up
                res = load(port, image, args.clients, args.requests, args.timeout_s)
                batch = mean_batch(port)
            finally:
                code = stop_server(proc)
            ok = res["statuses"].get(200, 0)
            rows.append({
                "max_batch": max_batch, "clients": args.clients, "requests": args.requests,
                "statuses": {str(k): v for k, v in sorted(res["statuses"].items(), key=str)},
                "img_s": ok / res["wall_s"], "p50_ms": 1000 * percentile(res["latencies"], 50),
                "p99_ms": 1000 * percentile(res["latencies"], 99), "mean_batch": batch, "exit": code,
            })  # fmt: skip
        offline = offline_img_s(checkpoint, image, max(args.max_batch), args.requests, args)
    print(f"{'max-batch':>9} {'clients':>7} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}  statuses")
    for r in rows:
        print(f"{r['max_batch']:>9} {r['clients']:>7} {r['img_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['mean_batch']:>6.1f}  {r['statuses']}")  # fmt: skip
    best = max(r["img_s"] for r in rows)
    print(f"offline (same decode + model, batches of {max(args.max_batch)}, no HTTP): {offline:.1f} img/s; "
          f"best server / offline = {best / offline:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "offline_img_s": offline}, indent=2) + "\n")


if __name__ == "__main__":
    main()
