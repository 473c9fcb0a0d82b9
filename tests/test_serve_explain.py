"""`eva02 serve`: POST /v1/explain (the PNG equals the library's drawing, Grad-CAM's class, batching,
every refusal) and the browser page's files at GET / (types, security headers, nothing from outside).

Uses the saved models, photos and in-process helpers of test_serve.py.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
import test_serve  # noqa: E402
from test_serve import Gate, in_thread, runner_of, serving, wait_until  # noqa: E402

files = test_serve.files  # the module-scoped fixture: saved models and photos

from eva02 import explain  # noqa: E402


def decoded(res) -> np.ndarray:
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(res.content)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def library_drawing(runner, data: bytes, method: str, target=None) -> np.ndarray:
    """The same explanation made with eva02.explain directly."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    maps, _ = explain.explain(runner.model, runner.transform(img)[None], method, target)
    view = explain.model_view(img, runner.preprocess)
    view.thumbnail((512, 512), Image.Resampling.BICUBIC)
    return np.asarray(explain.overlay(view, maps[0].numpy()), dtype=np.int16)


def test_explain_png_is_the_librarys_drawing(files) -> None:
    root, images = files
    runner = runner_of(root)
    with serving(runner) as (client, _):
        rollout = client.post("/v1/explain", files={"file": ("cat.png", images[0], "image/png")})
        raw = client.post("/v1/explain?method=attention-rollout", content=images[0])
        top = client.post("/v1/classify?topk=1", content=images[1]).json()["pred_label"]
        cam = client.post("/v1/explain?method=gradcam", content=images[1])
        other = (top + 1) % 1000
        cam_other = client.post(f"/v1/explain?method=gradcam&target={other}", content=images[1])
        info = client.get("/v1/model").json()
    assert rollout.headers["x-explain-method"] == "attention-rollout" and "x-explain-target" not in rollout.headers
    np.testing.assert_array_equal(decoded(rollout), decoded(raw))
    assert np.abs(decoded(rollout) - library_drawing(runner, images[0], "attention-rollout")).max() <= 1
    assert cam.headers["x-explain-target"] == str(top)  # Grad-CAM explains the top class by default
    assert np.abs(decoded(cam) - library_drawing(runner, images[1], "gradcam", top)).max() <= 1
    assert cam_other.headers["x-explain-target"] == str(other)
    assert np.abs(decoded(cam_other) - library_drawing(runner, images[1], "gradcam", other)).max() <= 1
    assert np.abs(decoded(cam_other) - decoded(cam)).max() > 10
    h, w = decoded(rollout).shape[:2]
    assert h == w == 120  # the 120 x 160 photo's centre square, the region the model saw
    assert info["explain_methods"] == ["attention-rollout", "gradcam"]


def test_explanations_are_batched_per_method_and_equal_unbatched(files) -> None:
    root, images = files
    runner = runner_of(root)
    gate = Gate(runner)
    with serving(runner, gate, max_batch=8) as (client, state):
        alone = [decoded(client.post("/v1/explain?method=gradcam", content=img)) for img in images[:3]]
        targets = [client.post("/v1/classify?topk=1", content=img).json()["pred_label"] for img in images[:3]]
        del gate.sizes[:]
        gate.close()
        first, first_out = in_thread(client.post, "/v1/features", content=images[0])
        assert gate.entered.wait(20)
        cams = [in_thread(client.post, "/v1/explain?method=gradcam", content=img) for img in images[:3]]
        chosen = in_thread(client.post, "/v1/explain?method=gradcam&target=5", content=images[0])
        rollouts = [in_thread(client.post, "/v1/explain", content=img) for img in images[:2]]
        wait_until(lambda: state.batcher.depth == 6, what="6 queued explanations")
        gate.opened.set()
        for t, _ in [(first, first_out), *cams, chosen, *rollouts]:
            t.join(30)
    assert sorted(gate.sizes) == [1, 2, 4]  # features; 4 Grad-CAMs in one call; 2 rollouts in another
    for (_, out), ref, top in zip(cams, alone, targets, strict=True):
        assert out[0].headers["x-explain-target"] == str(top)  # each image its own top class
        assert np.abs(decoded(out[0]) - ref).max() <= 2
    assert chosen[1][0].headers["x-explain-target"] == "5"
    assert all(out[0].status_code == 200 for _, out in rollouts)


def test_explain_refusals_are_one_line(files) -> None:
    root, images = files
    with serving(runner_of(root), max_upload_bytes=4000) as (client, _):
        cases = [
            (client.post("/v1/explain?method=lime", content=images[0]), 400, "method:"),
            (client.post("/v1/explain?target=3", content=images[0]), 400, "applies to gradcam only"),
            (client.post("/v1/explain?method=gradcam&target=1000", content=images[0]), 400, "classes 0 to 999"),
            (client.post("/v1/explain?method=gradcam&target=-1", content=images[0]), 400, "target:"),
            (client.post("/v1/explain", content=b"no image"), 400, "cannot load image 'request body'"),
            (client.post("/v1/explain", json={"image": "x"}), 415, "is not an image"),
            (client.post("/v1/explain", content=b"\0" * 5000), 413, "limit of 4000 bytes"),
        ]
    with serving(runner_of(root, "headless")) as (client, _):
        headless_cam = client.post("/v1/explain?method=gradcam", content=images[0])
        headless_rollout = client.post("/v1/explain", content=images[0])
        info = client.get("/v1/model").json()
    cases.append((headless_cam, 400, "no classifier head, so no Grad-CAM"))
    for res, status, words in cases:
        assert res.status_code == status and words in res.json()["detail"], (res.status_code, res.text)
        assert "\n" not in res.json()["detail"]
    assert decoded(headless_rollout).shape[2] == 3
    assert info["explain_methods"] == ["attention-rollout"]


def test_explain_times_out_like_the_other_routes(files) -> None:
    root, images = files
    runner = runner_of(root)
    gate = Gate(runner)
    with serving(runner, gate, timeout_s=0.5) as (client, _):
        gate.close()
        res = client.post("/v1/explain", content=images[0])
        gate.opened.set()
    assert res.status_code == 504 and "no result within 0.5 s" in res.json()["detail"]


# ---------------------------------------------------------------------------------------- page
def test_page_files_are_served_with_their_types_and_a_strict_policy(files) -> None:
    root, _ = files
    with serving(runner_of(root)) as (client, _):
        page = client.get("/")
        linked = [u for u in re.findall(r'(?:href|src)="([^"]+)"', page.text) if not u.startswith("data:")]
        assets = {path: client.get("/" + path) for path in linked}
        others = [client.get(path).status_code for path in ("/index.html", "/page/page.js", "/page.html")]
        metrics = client.get("/metrics").text
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert others == [404, 404, 404]  # the three files at their three paths, nothing else
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert sorted(linked) == ["page.css", "page.js"]  # relative: the page works under a path prefix
    assert assets["page.js"].headers["content-type"].startswith("text/javascript")
    assert assets["page.css"].headers["content-type"].startswith("text/css")
    everything = page.text + assets["page.js"].text + assets["page.css"].text
    assert not re.search(r"https?://", everything)  # nothing loaded from outside
    assert "<script>" not in page.text and " style=" not in page.text  # no inline code for the policy to allow
    for route in ("v1/model", "v1/classify", "v1/explain", "v1/zero-shot"):  # the routes the script calls
        assert route in assets["page.js"].text
    assert 'route="/"' in metrics


def test_the_page_ships_in_the_package() -> None:
    from importlib import resources

    page = resources.files("eva02.serve").joinpath("page")
    assert {p.name for p in page.iterdir()} >= {"index.html", "page.js", "page.css"}
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"serve/page/*"' in pyproject  # package data, so a wheel carries the page too


def test_gradcam_batches_mix_given_and_top_classes() -> None:
    from eva02.model.config import VARIANTS
    from eva02.model.vit import Eva02

    torch.manual_seed(0)
    model = Eva02(VARIANTS["test"].replace(num_classes=10)).eval()
    x = torch.randn(3, 3, 56, 56)
    _, classes = explain.gradcam(model, x, target=[None, 7, None])
    with torch.no_grad():
        top = model(x).argmax(-1)
    assert classes.tolist() == [int(top[0]), 7, int(top[2])]
