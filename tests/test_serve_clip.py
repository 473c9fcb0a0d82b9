"""`eva02 serve` with an EVA-02-CLIP model: /v1/zero-shot equals the library's zero-shot classifier,
/v1/embed/* equal encode_image / encode_text, image and text encodes are batched across requests, a
label set's head is computed once (cached, shared, dropped when nobody waits), every refusal, and the
command with CLIP names and files.

The tiny `test` CLIP (random weights) is saved with `save_clip`; in-process helpers and photos come
from test_serve.py.
"""

from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("open_clip")  # the tokenizer (the `clip` extra)
import test_serve  # noqa: E402
from test_serve import Gate, in_thread, metric_samples, runner_of, serving, wait_until  # noqa: E402

from eva02 import explain  # noqa: E402
from eva02.cli import main  # noqa: E402
from eva02.clip import tokenize, zero_shot_classifier  # noqa: E402
from eva02.model.clip import CLIP_VARIANTS, Eva02Clip  # noqa: E402
from eva02.serve.clip import ClipRunner  # noqa: E402
from eva02.weights.clip import get_clip, save_clip  # noqa: E402
from eva02.weights.zoo import Preprocess  # noqa: E402

files = test_serve.files  # the module-scoped fixture: saved classifiers and photos
LABELS = ["a cat", "a person", "a cup of coffee", "a rocket"]
TEMPLATES = ["a photo of {}.", "a drawing of {}."]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """The tiny CLIP with random weights, written by save_clip."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors"
    save_clip(Eva02Clip(CLIP_VARIANTS["test"]), path)
    return path


def clip_runner(path) -> ClipRunner:
    clip = get_clip(None, pretrained=path, device="cpu")
    return ClipRunner(clip, Preprocess(img_size=clip.cfg.vision.img_size), name="test-clip")


def image_of(runner: ClipRunner, data: bytes) -> torch.Tensor:
    return runner.transform(Image.open(io.BytesIO(data)).convert("RGB"))[None]  # (1, 3, S, S)


def zero_shot_form(labels, templates=None) -> dict:
    form = {"labels": json.dumps(labels)}
    if templates is not None:
        form["templates"] = json.dumps(templates)
    return form


def head_lookups(client) -> dict[str, float]:
    samples = metric_samples(client).get("eva02_zero_shot_heads", [])
    return {s.labels["result"]: s.value for s in samples if s.name.endswith("_total")}


# ------------------------------------------------------------------------------------- results
def test_zero_shot_equals_the_library(files, clip_file) -> None:
    _, images = files
    runner = clip_runner(clip_file)
    clip = runner.clip
    with serving(runner) as (client, _):
        multi = client.post(
            "/v1/zero-shot?topk=3", files={"file": ("cat.png", images[0])}, data=zero_shot_form(LABELS, TEMPLATES)
        )
        raw = client.post(
            "/v1/zero-shot", params={"topk": 3, "labels": json.dumps(LABELS), "templates": json.dumps(TEMPLATES)},
            content=images[0],
        )  # fmt: skip
        default = client.post("/v1/zero-shot?topk=9", files={"file": ("x.png", images[1])}, data=zero_shot_form(LABELS))
    assert multi.status_code == raw.status_code == default.status_code == 200, (multi.text, raw.text, default.text)
    assert multi.json() == raw.json()
    with torch.no_grad():
        for res, image, templates in ((multi, images[0], TEMPLATES), (default, images[1], ["a photo of a {}."])):
            head = zero_shot_classifier(clip, LABELS, templates)  # (E, C)
            emb = clip.encode_image(image_of(runner, image), normalize=True)  # (1, E)
            probs = (clip.logit_scale.exp() * emb @ head).softmax(-1)[0]
            order = probs.argsort(descending=True).tolist()
            rec = res.json()
            assert set(rec) == {"model", "pred_label", "pred_class", "pred_score", "topk"}
            k = len(rec["topk"])
            assert [t["label"] for t in rec["topk"]] == order[:k]
            assert [t["class"] for t in rec["topk"]] == [LABELS[i] for i in order[:k]]
            np.testing.assert_allclose([t["score"] for t in rec["topk"]], probs[order[:k]].numpy(), atol=2e-6)
            assert (rec["pred_label"], rec["pred_class"]) == (order[0], LABELS[order[0]])
    assert len(multi.json()["topk"]) == 3 and len(default.json()["topk"]) == len(LABELS)  # topk 9 > 4 labels


def test_embeddings_equal_encode_image_and_encode_text(files, clip_file) -> None:
    _, images = files
    runner = clip_runner(clip_file)
    texts = ["a photo of a cat", "", "Ünïcödé 東京 🙂", "word " * 100]
    with serving(runner) as (client, _):
        img = client.post("/v1/embed/image", files={"file": ("x.png", images[2])}).json()
        txt = client.post("/v1/embed/text", json={"texts": texts}).json()
        info = client.get("/v1/model").json()
    with torch.no_grad():
        ref_img = runner.clip.encode_image(image_of(runner, images[2]), normalize=True)[0]
        ref_txt = runner.clip.encode_text(tokenize(texts), normalize=True)
    assert img["model"] == txt["model"] == "test-clip" and img["dim"] == txt["dim"] == 64
    np.testing.assert_allclose(img["embedding"], ref_img.numpy(), atol=1e-5)
    np.testing.assert_allclose(txt["embeddings"], ref_txt.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt["embeddings"], axis=1), 1, atol=1e-5)
    assert info["kinds"] == ["zero-shot", "embed-image", "embed-text"] and info["num_classes"] == 0
    assert info["explain_methods"] == ["attention-rollout"] and info["embedding_dim"] == 64
    assert info["max_texts"] == 1024 and info["default_templates"] == ["a photo of a {}."]


def test_attention_rollout_on_the_image_tower(files, clip_file) -> None:
    _, images = files
    runner = clip_runner(clip_file)
    with serving(runner) as (client, _):
        res = client.post("/v1/explain", content=images[0])
    assert res.status_code == 200 and res.headers["x-explain-method"] == "attention-rollout"
    img = Image.open(io.BytesIO(images[0])).convert("RGB")
    maps, _ = explain.explain(runner.clip.visual, runner.transform(img)[None], "attention-rollout")
    view = explain.model_view(img, runner.preprocess)
    ref = np.asarray(explain.overlay(view, maps[0].numpy()), dtype=np.int16)
    got = np.asarray(Image.open(io.BytesIO(res.content)).convert("RGB"), dtype=np.int16)
    assert np.abs(got - ref).max() <= 1


# ------------------------------------------------------------------------------------ batching
def test_image_and_text_encodes_are_batched_and_a_head_is_computed_once(files, clip_file) -> None:
    _, images = files
    runner = clip_runner(clip_file)
    gate = Gate(runner)
    form = zero_shot_form(LABELS, TEMPLATES)
    with serving(runner, gate, max_batch=16) as (client, state):
        alone_zs = [client.post("/v1/zero-shot", content=img, params=form).json() for img in images[:3]]
        alone_img = [client.post("/v1/embed/image", content=images[3]).json()]
        alone_txt = [client.post("/v1/embed/text", json={"texts": t}).json() for t in (["a cat"], ["x", "y z"])]
        client.post("/v1/zero-shot", content=images[0], params=zero_shot_form(["cold"]))  # another head: a miss
        before = head_lookups(client)
        del gate.sizes[:]
        gate.close()
        first, first_out = in_thread(client.post, "/v1/embed/image", content=images[4])
        assert gate.entered.wait(20)  # in the model; what follows lines up behind it
        new = zero_shot_form(["a dog", "a bird"])  # a label set not computed yet: one head for three requests
        cold = [in_thread(client.post, "/v1/zero-shot", content=img, params=new) for img in images[:3]]
        warm = [in_thread(client.post, "/v1/zero-shot", content=img, params=form) for img in images[:3]]
        img = in_thread(client.post, "/v1/embed/image", content=images[3])
        txt = [in_thread(client.post, "/v1/embed/text", json={"texts": t}) for t in (["a cat"], ["x", "y z"])]
        wait_until(lambda: state.batcher.depth == 1 + 3 + 3 + 1 + 2, what="10 queued items")
        gate.opened.set()
        for t, _ in [(first, first_out), *cold, *warm, img, *txt]:
            t.join(30)
        after = head_lookups(client)
        samples = metric_samples(client)
    # one image call for 7 images (6 zero-shot, 1 embed), one text call for the new head and 2 requests
    assert sorted(gate.sizes) == [1, 3, 7]
    sizes = {s.labels["kind"]: s.value for s in samples["eva02_batch_size"] if s.name.endswith("_sum")}
    assert sizes["embed-image"] == 3 + 1 + 1 + 1 + 7 and sizes["embed-text"] == 1 + 2 + 1 + 3
    assert {k: after.get(k, 0) - before.get(k, 0) for k in ("miss", "shared", "hit")} == {
        "miss": 1, "shared": 2, "hit": 3,
    }  # fmt: skip
    for (_, out), ref in zip(warm, alone_zs, strict=True):
        got = out[0].json()
        assert [t["label"] for t in got["topk"]] == [t["label"] for t in ref["topk"]]
        np.testing.assert_allclose([t["score"] for t in got["topk"]], [t["score"] for t in ref["topk"]], atol=2e-6)
    for _, out in cold:
        assert out[0].status_code == 200 and out[0].json()["topk"][0]["class"] in ("a dog", "a bird")
    np.testing.assert_allclose(img[1][0].json()["embedding"], alone_img[0]["embedding"], atol=1e-5)
    for (_, out), ref in zip(txt, alone_txt, strict=True):
        np.testing.assert_allclose(out[0].json()["embeddings"], ref["embeddings"], atol=1e-5)


def test_head_cache_keeps_the_most_recent_label_sets(files, clip_file) -> None:
    _, images = files
    with serving(clip_runner(clip_file), head_cache=2) as (client, _):
        for labels in (["a", "b"], ["c", "d"], ["a", "b"], ["e", "f"], ["c", "d"], ["a", "b"]):
            res = client.post("/v1/zero-shot", content=images[0], params=zero_shot_form(labels))
            assert res.status_code == 200
        same_labels_other_templates = client.post(
            "/v1/zero-shot", content=images[0], params=zero_shot_form(["a", "b"], ["{}"])
        )
        lookups = head_lookups(client)
    assert same_labels_other_templates.status_code == 200
    # a b: miss; c d: miss; a b: hit; e f: miss (c d goes); c d: miss (a b goes); a b: miss; other templates: miss
    assert lookups == {"miss": 6, "hit": 1}


def test_a_head_nobody_waits_for_is_dropped(files, clip_file) -> None:
    _, images = files
    runner = clip_runner(clip_file)
    gate = Gate(runner)
    with serving(runner, gate, timeout_s=0.5) as (client, state):
        del gate.sizes[:]
        gate.close()
        first, first_out = in_thread(client.post, "/v1/embed/image", content=images[0])
        assert gate.entered.wait(20)
        late = client.post("/v1/zero-shot", content=images[1], params=zero_shot_form(["a dog", "a bird"]))
        first.join(20)
        assert state.batcher.depth == 0  # its image and its head's prompts left the queue
        gate.opened.set()
        again = client.post("/v1/zero-shot", content=images[1], params=zero_shot_form(["a dog", "a bird"]))
        lookups = head_lookups(client)
    assert late.status_code == 504 and "no result within 0.5 s" in late.json()["detail"]
    assert first_out[0].status_code == 504
    assert again.status_code == 200 and lookups == {"miss": 2}  # computed again: nothing was kept
    assert gate.sizes == [1, 1, 1]  # the first image, then the second try's prompts and image


# ---------------------------------------------------------------------------------- refusals
def test_each_kind_of_model_refuses_the_others_routes(files, clip_file) -> None:
    root, images = files
    with serving(runner_of(root)) as (client, _):
        cls = [client.post(r, content=images[0]) for r in ("/v1/zero-shot", "/v1/embed/image")]
        cls.append(client.post("/v1/embed/text", json={"texts": ["a"]}))
    with serving(clip_runner(clip_file)) as (client, _):
        classify = client.post("/v1/classify", content=images[0])
        features = client.post("/v1/features", content=images[0])
        gradcam = client.post("/v1/explain?method=gradcam", content=images[0])
    for res in cls:
        assert res.status_code == 400 and "is not an EVA-02-CLIP model" in res.json()["detail"], res.text
    assert classify.status_code == 400 and "POST /v1/zero-shot" in classify.json()["detail"]
    assert features.status_code == 400 and "POST /v1/embed/image" in features.json()["detail"]
    assert gradcam.status_code == 400 and "Grad-CAM" in gradcam.json()["detail"]


def test_bad_zero_shot_and_text_requests_are_one_line(files, clip_file) -> None:
    _, images = files
    img = images[0]
    limit = len(img) + 4000  # room for the form around the image
    with serving(clip_runner(clip_file), max_texts=4, max_upload_bytes=limit) as (client, _):

        def zs(form=None, params=None, **kw):
            if form is not None:
                return client.post("/v1/zero-shot", files={"file": ("cat.png", img)}, data=form, params=params)
            return client.post("/v1/zero-shot", params=params, **kw)

        cases = [
            (zs(form={}), 400, "labels: give the labels"),
            (zs(form={"labels": "cat, dog"}), 400, "labels: not valid JSON"),
            (zs(form={"labels": "[]"}), 400, "labels: expected a non-empty JSON list of strings, got []"),
            (zs(form={"labels": '"cat"'}), 400, "got str"),
            (zs(form={"labels": '["cat", 3]'}), 400, "got a list with other items"),
            (zs(form={"labels": '["cat", " "]'}), 400, "labels: item 1 is empty"),
            (zs(form={"labels": '["a"]'}, params={"labels": '["b"]'}), 400, "given both"),
            (zs(form=zero_shot_form(["a"], ["a photo"])), 400, "templates: 'a photo' is not a template"),
            (zs(form=zero_shot_form(["a"], ["{} and {}"])), 400, "is not a template"),
            (zs(form=zero_shot_form(["a"], ["{x}"])), 400, "is not a template"),
            (zs(form=zero_shot_form(["a", "b", "c"], ["{}", "a {}"])), 400, "3 x 2 prompts, more than the limit of 4"),
            (zs(params={"labels": "nope"}, content=img), 400, "labels: not valid JSON"),
            (zs(form={"labels": '["a"]'}, params={"topk": 0}), 400, "topk:"),
            (zs(params={"labels": '["a"]'}, content=b"no image"), 400, "cannot load image 'request body'"),
            (zs(params={"labels": '["a"]'}, json={"image": "x"}), 415, "is not an image"),
            (zs(params={"labels": '["a"]'}, content=b"\0" * (limit + 1)), 413, f"limit of {limit} bytes"),
            (client.post("/v1/zero-shot", files={"labels": (None, '["a"]')}), 400, "the multipart form has no file"),
            (client.post("/v1/embed/text", content=b'{"texts": ["a"]}'), 415, "Content-Type: application/json"),
            (client.post("/v1/embed/text", content=b"{", headers={"content-type": "application/json"}), 400,
             "the body is not valid JSON"),
            (client.post("/v1/embed/text", json={"texts": []}), 400, "texts: expected a non-empty JSON list"),
            (client.post("/v1/embed/text", json={"texts": "a"}), 400, "got str"),
            (client.post("/v1/embed/text", json={"text": ["a"]}), 400, 'one field, "texts"'),
            (client.post("/v1/embed/text", json=["a"]), 400, 'one field, "texts"'),
            (client.post("/v1/embed/text", json={"texts": ["a"] * 5}), 400, "5 texts, more than the limit of 4"),
            (client.post("/v1/embed/text", json={"texts": ["a" * limit]}), 413, f"limit of {limit} bytes"),
            (client.post("/v1/embed/image", content=b""), 400, "the file is empty"),
        ]  # fmt: skip
        ok = zs(form=zero_shot_form(["a", "b"], ["{}", "a {}"]))  # 4 prompts: at the limit
        texts_ok = client.post("/v1/embed/text", json={"texts": ["a"] * 4})
    for res, status, words in cases:
        assert res.status_code == status and words in res.json()["detail"], (status, words, res.text)
        assert "\n" not in res.json()["detail"]
    assert ok.status_code == 200 and texts_ok.status_code == 200


def test_busy_and_warming_up_are_503_on_the_clip_routes(files, clip_file) -> None:
    _, images = files
    runner = clip_runner(clip_file)
    gate = Gate(runner)
    gate.close()  # holds the warm-up
    with serving(runner, gate, ready=False, max_queue=1) as (client, _):
        assert gate.entered.wait(20)
        early = client.post("/v1/embed/text", json={"texts": ["a"]})
        gate.opened.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, what="readyz")
        gate.close()
        held, held_out = in_thread(client.post, "/v1/embed/image", content=images[0])
        assert gate.entered.wait(20)
        busy = client.post("/v1/zero-shot", content=images[1], params=zero_shot_form(["a"]))
        gate.opened.set()
        held.join(30)
        samples = metric_samples(client)
    assert early.status_code == 503 and early.headers["retry-after"] == "1"
    assert busy.status_code == 503 and "busy" in busy.json()["detail"]
    assert held_out[0].status_code == 200
    routes = {(s.labels["route"], s.labels["status"]) for s in samples["eva02_requests"]}
    assert {("/v1/embed/text", "503"), ("/v1/zero-shot", "503"), ("/v1/embed/image", "200")} <= routes


# -------------------------------------------------------------------------------------- command
def test_command_checks_clip_names_and_files_before_the_port(files, clip_file, capsys) -> None:
    root, _ = files
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (["serve", "-m", "EVA02-CLIP-B-61"], "unknown CLIP model 'EVA02-CLIP-B-61'; closest: EVA02-CLIP-B-16"),
            (["serve", "-m", "EVA02-B-16", "--img-size", "230"], "multiple of the model's patch size 16"),
            (["serve", "-m", "EVA02-B-16", "--checkpoint", str(root / "none.pt")], "does not exist"),
            (["serve", "--checkpoint", str(clip_file), "--dtype", "fp16", "--device", "cpu"], "needs a CUDA device"),
            (["serve", "--checkpoint", str(clip_file), "--port", port], f"cannot listen on 127.0.0.1 port {port}"),
        ]
        for argv, expected in cases:
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and expected in err[0], (argv, err)


@pytest.fixture
def served(monkeypatch):
    """Runs `eva02 serve` up to the server, which is not started: the app it would serve is kept."""
    from eva02.serve import server

    apps = []
    monkeypatch.setattr(server, "run", lambda app, sock, **kw: apps.append(app))
    threads = torch.get_num_threads()
    yield apps
    torch.set_num_threads(threads)  # the command sets torch's thread count for the process


def test_command_serves_our_clip_file_and_open_clip_files_by_name(clip_file, tmp_path, monkeypatch, served, capsys):
    """`--checkpoint` of our file (its config inside), and `-m NAME --checkpoint` of an open_clip file
    loaded into that name's architecture (here a zoo entry of the tiny config)."""
    from dataclasses import replace

    from eva02.weights import zoo
    from eva02.weights.convert import clip_from_ours

    ours = get_clip(None, pretrained=clip_file)
    torch.save(clip_from_ours(ours.state_dict(), "open_clip", ours.cfg.vision), tmp_path / "open_clip_model.bin")
    entry = replace(zoo.CLIP_ZOO["EVA02-CLIP-B-16"], name="EVA02-CLIP-test", cfg=ours.cfg,
                    preprocess=Preprocess(img_size=ours.cfg.vision.img_size))  # fmt: skip
    monkeypatch.setattr(zoo, "find_clip", lambda name: entry if name == "EVA02-test" else None)
    assert main(["serve", "--checkpoint", str(clip_file), "--port", "0"]) == 0
    argv = ["serve", "-m", "EVA02-test", "--checkpoint", str(tmp_path / "open_clip_model.bin"), "--port", "0"]
    assert main(argv) == 0
    capsys.readouterr()  # the two URL lines
    open_clip_file = str(tmp_path / "open_clip_model.bin")
    classifier = "eva02-tiny-p14_in21k-pre_3rdparty_in1k"
    for wrong in (  # a CLIP file without its CLIP name
        ["serve", "--checkpoint", open_clip_file, "--port", "0"],
        ["serve", "-m", classifier, "--checkpoint", open_clip_file, "--port", "0"],
    ):
        assert main(wrong) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is an EVA-02-CLIP checkpoint (open_clip format): name its CLIP model" in err[0]
    for app, name in zip(served, ("tiny-clip", "EVA02-CLIP-test"), strict=True):
        runner = app.state.serve.runner
        assert isinstance(runner, ClipRunner) and runner.name == name
        sd = runner.clip.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in ours.state_dict().items())
