"""`eva02 serve`: micro-batching, results equal to `predict`/`features`, every error code, health,
readiness, metrics, the command's one-line errors, and a graceful stop under a real uvicorn process.

Most tests drive the app in-process through Starlette's TestClient. A `Gate` holds the model thread
so that requests line up deterministically (a busy 2-core machine makes timing-based tests flaky).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from eva02.cli import main  # noqa: E402
from eva02.inference import load_for_inference  # noqa: E402
from eva02.model.config import VARIANTS  # noqa: E402
from eva02.model.vit import Eva02  # noqa: E402
from eva02.serve import ModelRunner, ServeSettings, create_app  # noqa: E402
from eva02.serve.batcher import Batcher  # noqa: E402
from eva02.weights.load import save_checkpoint  # noqa: E402


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Saved random classifier and headless models, and 8 different small photos as PNG bytes."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    cls = Eva02(VARIANTS["test"].replace(num_classes=1000))
    with torch.no_grad():
        cls.head.weight.normal_(0, 0.5)  # distinct top classes per photo
    save_checkpoint(cls, root / "cls.safetensors", name="test-cls")
    save_checkpoint(Eva02(VARIANTS["test"]), root / "headless.safetensors", name="test-headless")
    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    images = [png(p[40 * i : 40 * i + 120, 60 * i : 60 * i + 160]) for i in range(2) for p in photos]
    return root, images


def runner_of(root, which: str = "cls") -> ModelRunner:
    model, pre = load_for_inference(None, checkpoint=root / f"{which}.safetensors", device="cpu")
    return ModelRunner(model, pre, name=f"test-{which}")


class Gate:
    """Wraps a runner's model call: while closed, calls wait (and are recorded) until it opens."""

    def __init__(self, runner: ModelRunner) -> None:
        self.opened = threading.Event()
        self.opened.set()
        self.entered = threading.Event()
        self.sizes: list[int] = []
        inner = runner.run

        def run(kind, images):
            self.sizes.append(len(images))
            self.entered.set()
            assert self.opened.wait(30), "the gate was never opened"
            return inner(kind, images)

        runner.run = run  # before create_app, which hands runner.run to the batcher

    def close(self) -> None:
        self.entered.clear()
        self.opened.clear()


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(runner: ModelRunner, gate: Gate | None = None, ready: bool = True, **settings):
    app = create_app(runner, ServeSettings(**settings))
    with TestClient(app) as client:
        try:
            if ready:
                wait_until(lambda: client.get("/readyz").status_code == 200, what="readyz")
            yield client, app.state.serve
        finally:  # a failed test must not leave the shutdown waiting on a closed gate
            if gate is not None:
                gate.opened.set()


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)), daemon=True)
    t.start()
    return t, out


def metric_samples(client: TestClient) -> dict[str, list]:
    text = client.get("/metrics").text
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


# ------------------------------------------------------------------------------------- results
def test_classify_multipart_and_raw_equal_predictor(files) -> None:
    root, images = files
    runner = runner_of(root)
    with serving(runner) as (client, _):
        multi = client.post("/v1/classify?topk=3", files={"file": ("cat.png", images[0], "image/png")})
        raw = client.post("/v1/classify?topk=3", content=images[0], headers={"content-type": "image/png"})
    assert multi.status_code == raw.status_code == 200
    assert multi.json() == raw.json()
    rec = multi.json()
    assert set(rec) == {"model", "pred_label", "pred_class", "pred_score", "topk"}  # predict --json's, + model
    ref = runner.predictor.predict([Image.open(io.BytesIO(images[0]))], 3)[0]
    assert rec["model"] == "test-cls" and rec["pred_label"] == ref["pred_label"]
    assert rec["pred_class"] == ref["pred_class"] and rec["pred_score"] == pytest.approx(ref["pred_score"], abs=1e-6)
    assert [(t["label"], t["class"]) for t in rec["topk"]] == [(lab, cls) for lab, cls, _ in ref["topk"]]


def test_features_are_the_pooled_embedding(files) -> None:
    root, images = files
    runner = runner_of(root, "headless")
    with serving(runner) as (client, _):
        rec = client.post("/v1/features", files={"file": ("x.png", images[1])}).json()
        refused = client.post("/v1/classify", content=images[1])
        info = client.get("/v1/model").json()
    x = runner.transform(Image.open(io.BytesIO(images[1])).convert("RGB"))[None]
    with torch.no_grad():
        (ref,) = runner.model.extract_feat(x, out_type="avg_featmap")  # (1, D)
    assert rec["dim"] == runner.model.num_features == len(rec["embedding"])
    np.testing.assert_allclose(rec["embedding"], ref[0].numpy(), atol=1e-5)
    assert refused.status_code == 400 and "/v1/features" in refused.json()["detail"]
    assert info["kinds"] == ["features"] and info["num_classes"] == 0


def test_batch_forms_under_concurrency_and_equals_unbatched(files) -> None:
    root, images = files
    runner = runner_of(root)
    gate = Gate(runner)
    with serving(runner, gate, max_batch=32, max_wait_ms=5) as (client, state):
        del gate.sizes[:]  # the warm-up calls
        one_by_one = {
            (kind, i): client.post(f"/v1/{kind}", content=img).json()
            for kind in ("features", "classify")
            for i, img in enumerate(images)
        }
        assert gate.sizes == [1] * 16  # one request at a time: batches of one
        del gate.sizes[:]
        gate.close()
        first, first_out = in_thread(client.post, "/v1/features", content=images[0])
        assert gate.entered.wait(20)  # the first batch (of one) is in the model; the others line up behind it
        rest = {
            (kind, i): in_thread(client.post, f"/v1/{kind}", content=img)
            for kind in ("features", "classify")
            for i, img in enumerate(images)
            if (kind, i) != ("features", 0)
        }
        wait_until(lambda: state.batcher.depth == 15, what="15 queued requests")
        gate.opened.set()
        for t, _ in [(first, first_out), *rest.values()]:
            t.join(30)
        samples = metric_samples(client)
    batched = {("features", 0): first_out[0], **{k: out[0] for k, (_, out) in rest.items()}}
    assert sorted(gate.sizes) == [1, 7, 8]  # features 1..7 in one call, the 8 classify requests in another
    count = sum(s.value for s in samples["eva02_batch_size"] if s.name.endswith("_count"))
    ones = sum(s.value for s in samples["eva02_batch_size"] if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
    total = sum(s.value for s in samples["eva02_batch_size"] if s.name.endswith("_sum"))
    assert (count, ones, total) == (16 + 3, 16 + 1, 32)  # 16 calls one by one, then 3 for 16 requests
    for key, res in batched.items():
        assert res.status_code == 200, res.text
        got, ref = res.json(), one_by_one[key]
        if key[0] == "features":
            np.testing.assert_allclose(got["embedding"], ref["embedding"], rtol=1e-5, atol=1e-5)
        else:
            assert [t["label"] for t in got["topk"]] == [t["label"] for t in ref["topk"]]
            np.testing.assert_allclose([t["score"] for t in got["topk"]], [t["score"] for t in ref["topk"]], atol=2e-6)


# ---------------------------------------------------------------------------------- error codes
@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "the file is empty (0 bytes)"),
        (b"just some text, no image", "not an image format PIL can read"),
        ("truncated", "truncated or corrupt image data"),
        ("bomb", "too many pixels"),
    ],
)
def test_bad_images_are_400_naming_the_problem(files, monkeypatch, body, reason) -> None:
    root, images = files
    if body == "truncated":
        body = images[0][: len(images[0]) // 2]
    elif body == "bomb":  # over PIL's decompression-bomb limit, lowered here for a small file
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
        body = images[0]
    with serving(runner_of(root)) as (client, _):
        multi = client.post("/v1/classify", files={"file": ("cat.png", body)})
        raw = client.post("/v1/features", content=body)
        ok_after = client.post("/v1/features", content=images[2]) if reason != "too many pixels" else None
    assert multi.status_code == raw.status_code == 400
    assert multi.json()["detail"].startswith("cannot load image 'cat.png': " + reason)
    assert raw.json()["detail"].startswith("cannot load image 'request body': " + reason)
    assert "/proc/" not in multi.text + raw.text
    assert ok_after is None or ok_after.status_code == 200


def test_form_without_a_file_and_bad_topk_are_400_and_json_is_415(files) -> None:
    root, images = files
    with serving(runner_of(root)) as (client, _):
        no_file = client.post("/v1/classify", files={"note": (None, "hello")})  # multipart, one text field
        curl_style = client.post(  # curl --data-binary @x.png calls the body a urlencoded form
            "/v1/classify", content=images[0], headers={"content-type": "application/x-www-form-urlencoded"}
        )
        as_json = client.post("/v1/features", json={"image": "cat.png"})
        topk = client.post("/v1/classify?topk=0", content=images[0])
    assert no_file.status_code == 400 and "the multipart form has no file" in no_file.json()["detail"]
    assert curl_style.status_code == 200
    assert as_json.status_code == 415 and "type application/json is not an image" in as_json.json()["detail"]
    assert topk.status_code == 400 and topk.json()["detail"].startswith("topk:")


def test_upload_over_the_limit_is_413(files) -> None:
    root, images = files
    small = png(np.full((8, 8, 3), 200, np.uint8))
    assert len(small) < 1000 < len(images[0])
    with serving(runner_of(root), max_upload_bytes=1000) as (client, _):
        declared = client.post("/v1/classify", content=images[0])
        multi = client.post("/v1/classify", files={"file": ("cat.png", images[0])})
        chunked = client.post("/v1/features", content=iter([images[0][:600], images[0][600:]]))  # no length
        fits = client.post("/v1/classify", content=small)
    for res in (declared, multi, chunked):
        assert res.status_code == 413 and "limit of 1000 bytes" in res.json()["detail"]
    assert fits.status_code == 200


def test_full_queue_is_503_with_retry_after_and_not_ready_before_warm_up(files) -> None:
    root, images = files
    runner = runner_of(root)
    gate = Gate(runner)
    gate.close()  # holds the warm-up call
    with serving(runner, gate, ready=False, max_queue=1) as (client, state):
        assert gate.entered.wait(20)
        warming = client.get("/readyz")
        early = client.post("/v1/classify", content=images[0])
        assert client.get("/healthz").json() == {"status": "ok"}
        gate.opened.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, what="readyz")
        gate.close()
        held, held_out = in_thread(client.post, "/v1/classify", content=images[0])
        assert gate.entered.wait(20)
        busy = client.post("/v1/classify", content=images[1])
        gate.opened.set()
        held.join(30)
        samples = metric_samples(client)
    assert warming.status_code == 503 and warming.json()["status"] == "warming up"
    assert early.status_code == 503 and early.headers["retry-after"] == "1"
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
    assert held_out[0].status_code == 200
    by_status = {(s.labels["route"], s.labels["status"]): s.value for s in samples["eva02_requests"]}
    assert by_status[("/v1/classify", "503")] == 2 and by_status[("/v1/classify", "200")] == 1


def test_timeout_is_504_and_timed_out_requests_never_reach_the_model(files) -> None:
    root, images = files
    runner = runner_of(root)
    gate = Gate(runner)
    with serving(runner, gate, timeout_s=0.5) as (client, state):
        del gate.sizes[:]
        gate.close()
        a, a_out = in_thread(client.post, "/v1/classify", content=images[0])  # in the model when it times out
        assert gate.entered.wait(20)
        b, b_out = in_thread(client.post, "/v1/classify", content=images[1])  # times out in the queue
        a.join(20)
        b.join(20)
        assert state.batcher.depth == 0  # the timed-out request left the queue
        gate.opened.set()
        after = client.post("/v1/classify", content=images[2])
    for res in (a_out[0], b_out[0]):
        assert res.status_code == 504 and "no result within 0.5 s" in res.json()["detail"]
    assert after.status_code == 200
    assert gate.sizes == [1, 1]  # a's call and the last request's: b's image was never computed


def test_health_ready_and_metrics_format(files) -> None:
    root, images = files
    with serving(runner_of(root)) as (client, _):
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready", "model": "test-cls"}
        client.post("/v1/classify", content=images[0])
        client.get("/no/such/page")
        res = client.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    fams = {fam.name: fam for fam in text_string_to_metric_families(res.text)}
    for name, kind in [
        ("eva02_requests", "counter"),
        ("eva02_request_duration_seconds", "histogram"),
        ("eva02_batch_size", "histogram"),
        ("eva02_batch_duration_seconds", "histogram"),
        ("eva02_queue_depth", "gauge"),
        ("eva02_requests_in_progress", "gauge"),
    ]:
        assert fams[name].type == kind, name
    routes = {(s.labels["route"], s.labels["status"]) for s in fams["eva02_requests"].samples}
    assert {("/v1/classify", "200"), ("/readyz", "200"), ("other", "404")} <= routes
    assert [s.value for s in fams["eva02_queue_depth"].samples] == [0]
    assert fams["eva02_model_info"].samples[0].labels["model"] == "test-cls"


# ------------------------------------------------------------------------------------- batcher
def test_batcher_waits_for_late_items_never_mixes_kinds_and_drains_on_close() -> None:
    import asyncio

    calls: list[tuple[str, list]] = []

    def run(kind, items):
        calls.append((kind, list(items)))
        if "boom" in items:
            raise RuntimeError("boom")
        return [f"{kind}:{x}" for x in items]

    async def scenario():
        b = Batcher(run, max_batch=3, max_wait_s=0.3)
        b.start()
        first = b.submit("a", 1)
        await asyncio.sleep(0.02)
        late = b.submit("a", 2)  # within the wait: same batch
        other = b.submit("b", 9)  # another kind: its own batch
        assert await first == "a:1" and await late == "a:2" and await other == "b:9"
        full = [b.submit("a", i) for i in range(3)]  # a full batch goes without waiting
        t0 = asyncio.get_running_loop().time()
        assert await asyncio.gather(*full) == ["a:0", "a:1", "a:2"]
        assert asyncio.get_running_loop().time() - t0 < 0.25
        bad = [b.submit("c", "boom"), b.submit("c", 5)]
        results = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)  # every caller of the failed batch hears of it
        queued = [b.submit("d", i) for i in range(5)]
        await b.close()  # drains what was queued
        assert [f.result() for f in queued] == [f"d:{i}" for i in range(5)]

    asyncio.run(scenario())
    assert calls[:3] == [("a", [1, 2]), ("b", [9]), ("a", [0, 1, 2])]
    assert [len(items) for kind, items in calls if kind == "d"] == [3, 2]


# -------------------------------------------------------------------------------------- command
def test_command_errors_are_one_line_before_any_model_loads(files, capsys, monkeypatch) -> None:
    root, _ = files
    ck = str(root / "cls.safetensors")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (["serve"], "give -m/--model NAME"),
            (["serve", "--checkpoint", str(root / "none.safetensors")], "does not exist"),
            (["serve", "--checkpoint", ck, "--port", port], f"cannot listen on 127.0.0.1 port {port}"),
        ]
        for argv, expected in cases:
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and expected in err[0], (argv, err)
    with pytest.raises(SystemExit) as e:  # argparse's own check, in the house format
        main(["serve", "--checkpoint", ck, "--max-batch", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--max-batch: must be 1 or more" in err[0]
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the extra were not installed
    assert main(["serve", "--checkpoint", ck]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'eva02[serve]'" in err[0]


def _post(port: int, body: bytes) -> tuple[int, bytes] | str:
    """One POST on a new connection: (status, body), or 'refused' if no connection was accepted."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/classify", body=body, headers={"content-type": "image/png"})
        res = conn.getresponse()
        return res.status, res.read()
    except ConnectionRefusedError:
        return "refused"
    finally:
        conn.close()


def test_sigterm_lets_requests_in_flight_finish(files) -> None:
    root, images = files
    argv = ["serve", "--checkpoint", str(root / "cls.safetensors"), "--port", "0", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "eva02", *argv], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        wait_until(lambda: any(" at http://" in line for line in lines) or proc.poll() is not None, 60, "the URL")
        found = [re.search(r" at http://127\.0\.0\.1:(\d+) ", line) for line in lines]
        port = int(next(m for m in found if m).group(1))

        def ready() -> bool:
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/readyz")
                return conn.getresponse().status == 200
            return False

        wait_until(ready, 60, "readyz")
        # A request whose body is half sent when SIGTERM arrives: in flight for sure.
        body = images[0]
        head = f"POST /v1/classify?topk=2 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}"
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(head.encode() + b"\r\n\r\n" + body[:100])
        others = [in_thread(_post, port, img) for img in images[:4]]
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)

        def refusing() -> bool:  # the listener is closed: new connections are refused, not accepted
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except ConnectionRefusedError:
                return True

        wait_until(refusing, 20, "the listener to close")
        time.sleep(1.5)  # well past uvicorn's own pause after closing: only a drain keeps the server up now
        assert proc.poll() is None  # still draining: it waits for the slow request
        slow.sendall(body[100:])
        res = http.client.HTTPResponse(slow)
        res.begin()
        status, payload = res.status, json.loads(res.read())
        slow.close()
        for t, _ in others:
            t.join(30)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 200 and len(payload["topk"]) == 2
    for _, out in others:  # each got its answer or was never accepted; none was dropped
        assert out and (out[0] == "refused" or out[0][0] == 200), out
    assert not any("Traceback" in line for line in lines), "".join(lines)
