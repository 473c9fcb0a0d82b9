"""The page of `eva02 serve` in a real headless Chromium, driven by Playwright: a real server process
with a small random model, a photo chosen through the page's file field, the top-k bars and the
explanation overlay awaited and checked against the server's own answers, a class clicked for its
Grad-CAM map, and a file that is no image. With a tiny random EVA-02-CLIP: the zero-shot labels field
appears, and the labels typed in give the bars of POST /v1/zero-shot.

Skips, saying why, where Playwright or a Chromium is missing (Debian: `apt-get install chromium`;
or `playwright install chromium`; `EVA02_CHROMIUM=/path/to/chrome` names another). A screenshot is
saved in the test's folder, and also to the path in `EVA02_SCREENSHOT` when set (the docs' picture:
`EVA02_SCREENSHOT=docs/serve_page.png pytest tests/test_serve_page.py`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

pytest.importorskip("fastapi")
from test_serve import wait_until  # noqa: E402

from eva02.model.config import VARIANTS  # noqa: E402
from eva02.model.vit import Eva02  # noqa: E402
from eva02.weights.load import save_checkpoint  # noqa: E402

# Chromium as root on a machine without network: no sandbox, no background connections, a fresh profile.
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


def chromium_candidates(own: str | None) -> list[str]:
    """Executables to try: EVA02_CHROMIUM, Playwright's own download, then the system's Chromium or Chrome."""
    found = [os.environ.get("EVA02_CHROMIUM"), own]
    found += [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")]
    return [p for p in dict.fromkeys(found) if p and os.path.isfile(p) and os.access(p, os.X_OK)]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        try:
            own = pw.chromium.executable_path
        except Exception:  # no browser downloaded for this Playwright
            own = None
        candidates = chromium_candidates(own)
        if not candidates:
            pytest.skip("no Chromium found: apt-get install chromium, playwright install chromium, or EVA02_CHROMIUM")
        errors = []
        for path in candidates:
            try:
                b = pw.chromium.launch(executable_path=path, args=FLAGS, timeout=60_000)
            except Exception as e:  # a browser that does not start here: try the next
                errors.append(f"{path}: {str(e).strip().splitlines()[0]}")
                continue
            yield b
            b.close()
            return
        pytest.skip("no Chromium would start: " + "; ".join(errors))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `eva02 serve` process with a random 1000-class model at 224 px (a 16 x 16 grid): its URL."""
    root = tmp_path_factory.mktemp("page")
    torch.manual_seed(0)
    model = Eva02(VARIANTS["test"].replace(num_classes=1000, img_size=224))
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)  # a clear top class
    save_checkpoint(model, root / "cls.safetensors", name="random-test-224")
    with serving(root / "cls.safetensors") as url:
        yield url, root


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory):
    """A real `eva02 serve` process with the tiny random EVA-02-CLIP (56 px), written by save_clip: its URL."""
    pytest.importorskip("open_clip", reason="the CLIP tokenizer needs open_clip (the clip extra)")
    from eva02.model.clip import CLIP_VARIANTS, Eva02Clip
    from eva02.weights.clip import save_clip

    root = tmp_path_factory.mktemp("page-clip")
    torch.manual_seed(0)
    save_clip(Eva02Clip(CLIP_VARIANTS["test"]), root / "tiny-clip.safetensors")
    with serving(root / "tiny-clip.safetensors") as url:
        yield url


@contextlib.contextmanager
def serving(checkpoint: Path):
    """`eva02 serve --checkpoint` in a process of its own, until the block ends: its URL once ready."""
    argv = ["serve", "--checkpoint", str(checkpoint), "--port", "0", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "eva02", *argv], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        wait_until(lambda: any(" at http://" in ln for ln in lines) or proc.poll() is not None, 120, "the URL")
        found = [re.search(r" at (http://127\.0\.0\.1:\d+) ", ln) for ln in lines]
        url = next(m for m in found if m).group(1)
        wait_until(lambda: get(url, "/readyz")[0] == 200, 120, "readyz")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not any("Traceback" in ln for ln in lines), "".join(lines)


def get(url: str, path: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)
        res = conn.getresponse()
        return res.status, res.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def classify(url: str, photo: Path, route: str = "/v1/classify?topk=5") -> dict:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", route, body=photo.read_bytes(), headers={"content-type": "image/png"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_page_shows_bars_and_overlay_for_a_photo(browser, server, tmp_path) -> None:
    url, root = server
    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    expected = classify(url, photo)
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-state=idle]", timeout=30_000)
    assert "random-test-224" in page.inner_text("#model")
    assert page.eval_on_selector_all("#method option", "os => os.map(o => o.value)") == ["attention-rollout", "gradcam"]
    assert page.is_hidden("#labels-row")  # zero-shot labels: only for CLIP models

    page.set_input_files("#file", str(photo))
    page.wait_for_selector("body[data-state=done]", timeout=120_000)
    names = page.eval_on_selector_all(".bar .name", "es => es.map(e => e.textContent)")
    widths = page.eval_on_selector_all(".bar .fill", "es => es.map(e => parseFloat(e.style.width))")
    assert names == [t["class"] for t in expected["topk"]]
    assert widths == pytest.approx([100 * t["score"] for t in expected["topk"]], abs=0.01)
    overlay = page.eval_on_selector("#overlay", "i => [i.complete, i.naturalWidth, i.naturalHeight]")
    assert overlay == [True, 300, 300]  # the photo's centre square (451 x 300), as the model saw it
    assert page.inner_text("#explain-title") == "Attention rollout"
    page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
    if os.environ.get("EVA02_SCREENSHOT"):
        page.screenshot(path=os.environ["EVA02_SCREENSHOT"], full_page=True)

    third = expected["topk"][2]
    page.click(f'.bar[data-label="{third["label"]}"]')  # a class's Grad-CAM map
    page.wait_for_function(
        "t => document.querySelector('#explain-title').textContent.startsWith(t)"
        " && document.body.dataset.state === 'done'",
        arg=f"Grad-CAM of class {third['label']} ({third['class']})",
        timeout=120_000,
    )
    assert page.input_value("#method") == "gradcam"
    assert page.get_attribute(f'.bar[data-label="{third["label"]}"]', "aria-pressed") == "true"

    junk = tmp_path / "notes.png"
    junk.write_bytes(b"these are notes, not an image")
    page.set_input_files("#file", str(junk))
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert page.inner_text("#error").startswith("cannot load image 'notes.png': not an image format")
    assert not problems or all("400" in p for p in problems), problems  # the refused upload's log line only
    page.close()


@pytest.mark.slow  # a second server and browser session (a CLIP model): about 20 s
def test_page_offers_zero_shot_labels_for_a_clip_model(browser, clip_server, tmp_path) -> None:
    url = clip_server
    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    labels = ["a cat", "a person", "a cup of coffee", "a rocket"]
    expected = classify(url, photo, "/v1/zero-shot?topk=5&labels=" + urllib.parse.quote(json.dumps(labels)))
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-state=idle]", timeout=30_000)
    assert "tiny-clip" in page.inner_text("#model") and "zero-shot" in page.inner_text("#model")
    assert page.is_visible("#labels-row") and page.is_enabled("#labels")
    assert page.eval_on_selector_all("#method option", "os => os.map(o => o.value)") == ["attention-rollout"]

    page.set_input_files("#file", str(photo))  # no labels yet: a hint instead of bars, and the overlay
    page.wait_for_selector("body[data-state=done]", timeout=120_000)
    assert page.inner_text("#bars-note").startswith("Type labels above")
    assert page.eval_on_selector_all(".bar", "es => es.length") == 0
    assert page.eval_on_selector("#overlay", "i => [i.complete, i.naturalWidth]") == [True, 300]

    page.fill("#labels", "a cat, a person\na cup of coffee,  a rocket")
    page.dispatch_event("#labels", "change")
    page.wait_for_function("() => document.querySelectorAll('.bar').length > 0", timeout=120_000)
    page.wait_for_selector("body[data-state=done]", timeout=120_000)
    names = page.eval_on_selector_all(".bar .name", "es => es.map(e => e.textContent)")
    widths = page.eval_on_selector_all(".bar .fill", "es => es.map(e => parseFloat(e.style.width))")
    assert names == [t["class"] for t in expected["topk"]] and sorted(names) == sorted(labels)
    assert widths == pytest.approx([100 * t["score"] for t in expected["topk"]], abs=0.01)
    assert page.inner_text("#classes-title") == "Top labels"
    page.screenshot(path=str(tmp_path / "serve_page_clip.png"), full_page=True)
    assert not problems, problems
    page.close()
