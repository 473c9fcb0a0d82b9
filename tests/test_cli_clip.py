"""`eva02 zero-shot`, `eva02 index` and `eva02 search` through `eva02.cli.main`, with the tiny random CLIP
(`CLIP_VARIANTS["test"]`) saved by `save_clip` and loaded with --checkpoint, on generated images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")  # the tokenizer (the clip extra)

import eva02.cli.clip as cli_clip  # noqa: E402
import eva02.cli.retrieval as cli_retrieval  # noqa: E402
from eva02 import retrieval as R  # noqa: E402
from eva02.cli import main  # noqa: E402
from eva02.clip import imagenet_classnames, zero_shot_classifier  # noqa: E402
from eva02.data.images import load_image  # noqa: E402
from eva02.data.transforms import eval_transform  # noqa: E402
from eva02.model.clip import CLIP_VARIANTS, Eva02Clip  # noqa: E402
from eva02.weights.clip import get_clip, save_clip  # noqa: E402
from eva02.weights.zoo import Preprocess  # noqa: E402

LABELS = ["red square", "green field", "blue sky", "noise"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny CLIP files of the same config (other weights), a folder of 9 images, a corrupt image."""
    root = tmp_path_factory.mktemp("clip_cli")
    for seed, name in ((0, "a.safetensors"), (1, "b.safetensors")):
        torch.manual_seed(seed)
        save_clip(Eva02Clip(CLIP_VARIANTS["test"]), root / name)
    torch.save({"visual.proj": torch.zeros(1)}, root / "sd.pt")  # a state dict that carries no config
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, colour in enumerate([(220, 20, 20), (20, 180, 40), (40, 90, 230)]):
        Image.new("RGB", (64, 48), colour).save(imgs / f"plain{i}.png")
    for i in range(6):
        folder = imgs / "sub" if i % 2 else imgs
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / f"noise{i}.jpg", quality=95)
    bad = root / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (30, 30), (255, 255, 0)).save(bad / "ok.png")
    return root, imgs, bad


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (one line too, through the house parser)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *words: str) -> None:
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, err


# ------------------------------------------------------------------------------------------ zero-shot
def test_zero_shot_json_equals_a_direct_computation(files, capsys) -> None:
    root, imgs, _ = files
    templates = ["a photo of a {}.", "a picture of the {}"]
    rc, out, err = run(
        capsys,
        "zero-shot",
        imgs,
        "--checkpoint",
        root / "a.safetensors",
        "--labels",
        ",".join(LABELS),
        "--templates",
        templates[0],
        "--templates",
        templates[1],
        "--json",
        "-k",
        "3",
        "-b",
        "4",
    )
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) == 9 and set(recs[0]) == {"path", "pred_label", "pred_class", "pred_score", "topk"}
    clip = get_clip(None, pretrained=root / "a.safetensors")
    tf = eval_transform(Preprocess(img_size=56))
    x = torch.stack([tf(load_image(r["path"])) for r in recs])
    with torch.no_grad():
        probs = (
            clip.logit_scale.exp()
            * clip.encode_image(x, normalize=True)
            @ zero_shot_classifier(clip, LABELS, templates)
        ).softmax(-1)
    for r, p in zip(recs, probs, strict=True):
        assert r["pred_class"] == LABELS[int(p.argmax())] == LABELS[r["pred_label"]]
        assert r["pred_score"] == pytest.approx(p.max().item(), abs=1e-5)
        assert [lab for lab, _ in r["topk"]] == [LABELS[i] for i in p.topk(3).indices.tolist()]
        assert r["topk"][0] == [r["pred_class"], r["pred_score"]]


def test_zero_shot_table_and_labels_file(files, capsys, tmp_path) -> None:
    root, imgs, _ = files
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n\n", encoding="utf-8")
    ckpt = root / "a.safetensors"
    rc, out, err = run(capsys, "zero-shot", imgs / "plain0.png", "--checkpoint", ckpt, "--labels-file", labels)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == str(imgs / "plain0.png") and len(lines) == 5  # the path, then 4 ranked labels
    assert lines[1].split()[0] == "1." and lines[1].split(maxsplit=2)[2] in LABELS
    rc, out2, _ = run(capsys, "zero-shot", imgs / "plain0.png", "--checkpoint", ckpt, "--labels", ",".join(LABELS))
    assert out2 == out
    (tmp_path / "t.txt").write_text("a photo of a {}.\n", encoding="utf-8")
    rc, out3, _ = run(
        capsys,
        "zero-shot",
        imgs / "plain0.png",
        "--checkpoint",
        ckpt,
        "--labels-file",
        labels,
        "--templates-file",
        tmp_path / "t.txt",
    )
    assert out3 == out  # the default template, from a file


def test_zero_shot_imagenet(files, capsys, monkeypatch) -> None:
    root, imgs, _ = files
    import eva02.clip

    monkeypatch.setattr(eva02.clip, "imagenet_templates", lambda: ["itap of a {}."])  # 1000 prompts, not 80000
    rc, out, err = run(
        capsys,
        "zero-shot",
        imgs / "plain1.png",
        "--checkpoint",
        root / "a.safetensors",
        "--imagenet",
        "--json",
        "-k",
        "1000",
    )
    assert rc == 0, err
    (rec,) = [json.loads(line) for line in out.splitlines()]
    names = imagenet_classnames()
    assert len(rec["topk"]) == 1000 and names[rec["pred_label"]] == rec["pred_class"]
    assert sum(s for _, s in rec["topk"]) == pytest.approx(1.0, abs=1e-4)


def test_zero_shot_skips_an_unreadable_image(files, capsys) -> None:
    root, _, bad = files
    rc, out, err = run(
        capsys, "zero-shot", bad, "--checkpoint", root / "a.safetensors", "--labels", "cat,dog", "--json"
    )
    assert rc == 1
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(bad / "ok.png")]
    assert f"warning: cannot load image '{bad / 'broken.png'}'" in err and "1 of 2 images failed" in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--labels", "cat,,dog"], ["empty label"]),
        (["--labels", "cat, dog ,cat"], ["'cat' is given twice"]),
        (["--labels", "cat"], ["at least two labels"]),
        (["--labels", "cat,dog", "--templates", "a photo of a cat"], ["needs exactly one {}"]),
        (["--labels", "cat,dog", "--templates", "a {} and a {}"], ["needs exactly one {}"]),
        (["--labels", "cat,dog", "--templates", "a {name}"], ["needs exactly one {}"]),
        (["--labels", "cat,dog", "--labels-file", "x.txt"], ["not allowed with argument"]),
        ([], ["one of the arguments --labels --labels-file --imagenet is required"]),
        (["--labels", "cat,dog", "--topk", "0"], ["must be 1 or more"]),
        (["--labels-file", "nope.txt"], ["--labels-file file 'nope.txt' does not exist"]),
    ],
)
def test_zero_shot_bad_input_is_one_line_before_the_model_loads(files, capsys, monkeypatch, args, words) -> None:
    root, imgs, _ = files
    monkeypatch.setattr(cli_clip, "load_clip", lambda *a: pytest.fail("the model loaded before the checks"))
    rc, _, err = run(capsys, "zero-shot", imgs, "--checkpoint", root / "a.safetensors", *args)
    assert rc == 2
    one_line_error(err, *words)


def test_zero_shot_labels_file_names_its_repeated_lines(files, capsys, monkeypatch, tmp_path) -> None:
    root, imgs, _ = files
    monkeypatch.setattr(cli_clip, "load_clip", lambda *a: pytest.fail("the model loaded before the checks"))
    (tmp_path / "l.txt").write_text("cat\ndog\n\ncat\n", encoding="utf-8")
    rc, _, err = run(
        capsys, "zero-shot", imgs, "--checkpoint", root / "a.safetensors", "--labels-file", tmp_path / "l.txt"
    )
    assert rc == 2
    one_line_error(err, "'cat' is given twice (lines 1 and 4 of")


def test_an_image_model_file_is_named_where_a_clip_file_is_needed_and_the_reverse(files, capsys, tmp_path) -> None:
    from eva02.model import VARIANTS
    from eva02.model.vit import Eva02
    from eva02.weights.load import save_checkpoint

    root, imgs, _ = files
    classifier = tmp_path / "cls.safetensors"
    save_checkpoint(Eva02(VARIANTS["test"].replace(num_classes=3)), classifier)
    for argv in (["zero-shot", imgs, "--labels", "a,b"], ["index", imgs, "-o", tmp_path / "i.safetensors"]):
        rc, _, err = run(capsys, *argv, "--checkpoint", classifier)
        assert rc == 2 and not (tmp_path / "i.safetensors").exists()
        one_line_error(err, "holds an EVA-02 image model, not an EVA-02-CLIP model", "eva02 list clip")
    rc, _, err = run(capsys, "predict", imgs, "--checkpoint", root / "a.safetensors")
    assert rc == 2
    one_line_error(err, "holds an EVA-02-CLIP model", "eva02 zero-shot")
    from eva02.weights.load import get_model

    with pytest.raises(ValueError, match="holds an EVA-02-CLIP model.*get_clip"):
        get_model(None, pretrained=root / "a.safetensors")
    for name in (None, "EVA02-CLIP-test"):  # a file that says what it holds, with or without a CLIP name
        with pytest.raises(ValueError, match="holds an EVA-02 image model.*get_model"):
            get_clip(name, pretrained=classifier)


@pytest.mark.parametrize(
    "args, words",
    [
        (["{imgs}/nope.jpg", "--checkpoint", "{root}/a.safetensors"], ["no such file or folder", "nope.jpg"]),
        (["{imgs}", "-m", "EVA02-CLIP-B-61"], ["unknown CLIP model 'EVA02-CLIP-B-61'", "closest: EVA02-CLIP-B-16"]),
        (["{imgs}"], ["give -m/--model NAME"]),
        (["{imgs}", "--checkpoint", "{root}/none.safetensors"], ["does not exist"]),
        (["{imgs}", "--checkpoint", "{root}/sd.pt"], ["does not say which CLIP model", "give -m NAME"]),
        (["{imgs}", "--checkpoint", "{imgs}/plain0.png"], ["plain0.png is not a checkpoint"]),
        (["{imgs}", "--checkpoint", "{root}/a.safetensors", "--device", "cuda:7"], ["--device cuda:7"]),
    ],
)
def test_zero_shot_bad_model_or_paths(files, capsys, monkeypatch, args, words) -> None:
    root, imgs, _ = files
    monkeypatch.setattr(cli_clip, "load_clip", lambda *a: pytest.fail("the model loaded before the checks"))
    if torch.cuda.is_available() and "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    rc, _, err = run(capsys, "zero-shot", *[a.format(root=root, imgs=imgs) for a in args], "--labels", "a,b")
    assert rc == 2
    one_line_error(err, *words)


def without(monkeypatch, package: str) -> None:
    """Imports of `package` fail from now on, as where it is not installed."""
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name.split(".")[0] == package:
            raise ModuleNotFoundError(f"No module named {name!r}", name=package)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_missing_extras_are_one_line_before_the_model_loads(files, capsys, monkeypatch, tmp_path) -> None:
    root, imgs, _ = files
    monkeypatch.setattr(cli_clip, "load_clip", lambda *a: pytest.fail("the model loaded before the checks"))
    ckpt = ["--checkpoint", root / "a.safetensors"]
    without(monkeypatch, "open_clip")
    for argv in (["zero-shot", imgs, "--labels", "a,b"], ["zero-shot", imgs, "--imagenet"]):
        rc, _, err = run(capsys, *argv, *ckpt)
        assert rc == 2
        one_line_error(err, "pip install 'eva02[clip]'")
    without(monkeypatch, "faiss")
    monkeypatch.setattr(cli_retrieval, "load_clip", lambda *a: pytest.fail("the model loaded before the checks"))
    rc, _, err = run(capsys, "index", imgs, "-o", tmp_path / "i.safetensors", "--ann", *ckpt)
    assert rc == 2 and not (tmp_path / "i.safetensors.parts").exists()
    one_line_error(err, "pip install 'eva02[ann]'")


def test_closed_stdout_ends_with_141(files, capsys, monkeypatch) -> None:
    root, imgs, _ = files

    def closed(text):
        raise cli_clip.StdoutClosed

    monkeypatch.setattr(cli_clip, "emit", closed)
    rc, _, err = run(capsys, "zero-shot", imgs, "--checkpoint", root / "a.safetensors", "--labels", "a,b")
    assert rc == 141 and err == ""


# ------------------------------------------------------------------------------------ index and search
def index_cmd(root, imgs, out, *extra):
    return ["index", imgs, "--checkpoint", root / "a.safetensors", "-o", out, "-b", "2", "--workers", "0", *extra]


def test_index_then_search_by_text_and_by_image(files, capsys, tmp_path) -> None:
    root, imgs, _ = files
    out = tmp_path / "photos.safetensors"
    rc, msg, err = run(capsys, *index_cmd(root, imgs, out))
    assert rc == 0, err
    assert msg.startswith(f"wrote {out}: 9 images; 64-d float16 embeddings")
    query = imgs / "sub" / "noise3.jpg"
    rc, out_json, err = run(capsys, "search", out, "--image", query, "--text", "a red square", "--json", "-k", "4")
    assert rc == 0, err
    text, image = (json.loads(line) for line in out_json.splitlines())
    assert image["kind"] == "image" and image["query"] == str(query)
    assert image["results"][0]["path"] == str(query.resolve()) and image["results"][0]["score"] == pytest.approx(
        1, abs=1e-3
    )
    assert image["results"][1]["score"] < 0.99
    clip = get_clip(None, pretrained=root / "a.safetensors")
    index = R.load_index(out)
    want = index.search(R.embed_texts(clip, ["a red square"]), topk=4)[0]
    assert [r["path"] for r in text["results"]] == [str(index.file(h.row)) for h in want]
    scores = [r["score"] for r in text["results"]]
    assert scores == sorted(scores, reverse=True) and text["kind"] == "text" and text["query"] == "a red square"
    rc, table, _ = run(capsys, "search", out, "--text", "a red square", "-k", "2")
    assert table.splitlines()[0] == "text: a red square" and table.splitlines()[1].endswith(text["results"][0]["path"])


def test_an_interrupted_index_continues_when_run_again(files, capsys, tmp_path, monkeypatch) -> None:
    root, imgs, _ = files
    write, calls = R._Parts.write, []

    def killed_after_one_part(self, emb, rows):
        calls.append(rows)
        if len(calls) > 1:
            raise KeyboardInterrupt
        write(self, emb, rows)

    monkeypatch.setattr(R._Parts, "write", killed_after_one_part)
    out = tmp_path / "i.safetensors"
    rc, _, err = run(capsys, *index_cmd(root, imgs, out, "--save-every", "4"))
    assert rc == 130 and "run the same command again to continue" in err
    assert not out.exists() and len(list(R.parts_dir(out).glob("part-*"))) == 1
    monkeypatch.setattr(R._Parts, "write", write)
    # another model cannot finish it, and is told which one can
    rc, _, err = run(capsys, "index", imgs, "--checkpoint", root / "b.safetensors", "-o", out)
    assert rc == 2
    one_line_error(err, "holds an unfinished index made with", "--checkpoint", "a.safetensors", "--force")
    rc, msg, err = run(capsys, *index_cmd(root, imgs, out, "--save-every", "4"))
    assert rc == 0, err
    assert "4 of 9 images are done" in err and "9 images, 4 of them from before" in msg
    rc, _, err = run(capsys, *index_cmd(root, imgs, tmp_path / "ref.safetensors"))
    a, b = R.load_index(out), R.load_index(tmp_path / "ref.safetensors")
    assert a.paths == b.paths
    torch.testing.assert_close(a.take(np.arange(9)), b.take(np.arange(9)), atol=1e-3, rtol=0)


def test_index_overwrite_rules(files, capsys, tmp_path, monkeypatch) -> None:
    root, imgs, _ = files
    out = tmp_path / "i.safetensors"
    assert run(capsys, *index_cmd(root, imgs, out))[0] == 0
    first = R.load_index(out).index_id
    monkeypatch.setattr(cli_retrieval, "load_clip", lambda *a: pytest.fail("the model loaded before the checks"))
    for extra, words in (
        ([], ["already exists", "--update", "--force"]),
        (["--update", "--force"], ["not both"]),
    ):
        rc, _, err = run(capsys, *index_cmd(root, imgs, out, *extra))
        assert rc == 2
        one_line_error(err, *words)
    for out_arg, words in ((tmp_path / "i.npy", ["must end in .safetensors"]), (root / "a.safetensors", ["input"])):
        rc, _, err = run(capsys, *index_cmd(root, imgs, out_arg, "--force"))
        assert rc == 2
        one_line_error(err, *words)
    monkeypatch.undo()
    rc, _, err = run(capsys, "index", imgs, "--checkpoint", root / "b.safetensors", "-o", out, "--update")
    assert rc == 2
    one_line_error(err, "never mixed", "rebuild it with --force")  # same config: told apart by the probe
    rc, msg, err = run(capsys, *index_cmd(root, imgs, out, "--update"))
    assert rc == 0 and msg == f"{out} is up to date: 9 images\n" and R.load_index(out).index_id == first
    rc, msg, err = run(capsys, "index", imgs, "--checkpoint", root / "b.safetensors", "-o", out, "--force")
    assert rc == 0, err
    assert R.load_index(out).index_id != first and R.load_index(out).model["checkpoint"].endswith("b.safetensors")


def test_index_of_a_folder_with_a_broken_image(files, capsys, tmp_path) -> None:
    root, _, bad = files
    out = tmp_path / "i.safetensors"
    rc, msg, err = run(capsys, *index_cmd(root, bad, out))
    assert rc == 1 and "broken.png" in err and "1 of 2 images failed" in err
    assert R.load_index(out).paths == ["ok.png"]


def test_search_refusals(files, capsys, tmp_path) -> None:
    root, imgs, _ = files
    out = tmp_path / "i.safetensors"
    assert run(capsys, *index_cmd(root, imgs, out))[0] == 0
    for argv, words in (
        ([out], ["give --text TEXT or --image FILE"]),
        ([out, "--text", "a cat", "--text", " "], ["--text is empty"]),
        ([out, "--text", "x", "--nprobe", "4"], ["add --ann"]),
        ([tmp_path / "nope.safetensors", "--text", "x"], ["does not exist", "eva02 index"]),
        ([root / "a.safetensors", "--text", "x"], ["not an index written by eva02"]),
        ([out, "--image", tmp_path / "nope.jpg"], ["--image", "no such file"]),
        ([out, "--text", "x", "--checkpoint", root / "b.safetensors"], ["holds embeddings of", "leave out -m"]),
        ([out, "--text", "x", "-m", "EVA02-CLIP-B-16"], ["holds embeddings of", "EVA02-CLIP-B-16"]),
    ):
        rc, _, err = run(capsys, "search", *argv)
        assert rc == 2
        one_line_error(err, *words)


def test_search_with_faiss(files, capsys, tmp_path) -> None:
    pytest.importorskip("faiss")
    root, imgs, _ = files
    out = tmp_path / "i.safetensors"
    rc, msg, err = run(capsys, *index_cmd(root, imgs, out, "--ann"))
    assert rc == 0 and f"wrote {out}.ann" in msg, err
    query = imgs / "plain2.png"
    results = []
    for extra in ([], ["--ann"]):
        rc, found, err = run(capsys, "search", out, "--image", query, "--json", "-k", "3", *extra)
        assert rc == 0, err
        results.append(json.loads(found)["results"])
    assert [r["path"] for r in results[0]] == [r["path"] for r in results[1]]
    assert run(capsys, *index_cmd(root, imgs, out, "--force"))[0] == 0  # a new version, without --ann
    rc, _, err = run(capsys, "search", out, "--image", query, "--ann")
    assert rc == 2
    one_line_error(err, "earlier version", "--update --ann")


def test_features_of_a_clip_tower_give_its_embeddings(files, capsys, tmp_path) -> None:
    """`eva02 features -m CLIP --out-type embedding` writes encode_image's embeddings, in file order."""
    from safetensors import safe_open

    root, imgs, _ = files
    out = tmp_path / "emb.safetensors"
    rc, _, err = run(capsys, "features", imgs, "-m", "EVA02-CLIP-test", "--checkpoint", root / "a.safetensors",
                     "--out-type", "embedding", "-o", out)  # fmt: skip
    assert rc == 0, err
    with safe_open(str(out), "np") as f:
        emb, order = f.get_tensor("features"), json.loads(f.metadata()["files"])
    assert emb.shape == (9, CLIP_VARIANTS["test"].embed_dim)
    clip = get_clip(None, pretrained=root / "a.safetensors")
    from eva02.data.transforms import eval_transform
    from eva02.weights.zoo import find_clip

    tf = eval_transform(find_clip("EVA02-CLIP-test").preprocess)
    with torch.no_grad():
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in order])
        np.testing.assert_allclose(emb, clip.encode_image(x).numpy(), rtol=1e-4, atol=1e-5)
    # A CLIP file written by eva02 says what it holds: no -m needed, the same embeddings.
    alone = tmp_path / "alone.safetensors"
    rc, _, err = run(capsys, "features", imgs, "--checkpoint", root / "a.safetensors", "--out-type", "embedding",
                     "-o", alone)  # fmt: skip
    assert rc == 0, err
    with safe_open(str(alone), "np") as f:
        np.testing.assert_array_equal(f.get_tensor("features"), emb)
        assert json.loads(f.metadata()["files"]) == order
    rc, _, err = run(capsys, "features", imgs, "-m", "eva02-tiny-p14_in21k-pre_3rdparty_in1k", "--out-type",
                     "embedding", "-o", tmp_path / "x.npy")  # fmt: skip
    assert rc == 2
    one_line_error(err, "CLIP")


def test_a_clip_file_given_with_an_image_model_name_is_named(files, capsys, tmp_path) -> None:
    """Ours and open_clip's layouts: said to hold a CLIP model, not 'pass --fmt' (its keys are no
    classifier format)."""
    from eva02.weights.convert import clip_from_ours
    from eva02.weights.load import get_model

    root, imgs, _ = files
    theirs = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip_from_ours(get_clip(None, pretrained=root / "a.safetensors").state_dict(), "open_clip"), theirs)
    tiny = "eva02-tiny-p14_in21k-pre_3rdparty_in1k"
    for ckpt, fmt in ((root / "a.safetensors", "eva02 format"), (theirs, "open_clip format")):
        rc, _, err = run(capsys, "predict", imgs, "-m", tiny, "--checkpoint", ckpt)
        assert rc == 2
        one_line_error(err, f"holds an EVA-02-CLIP model ({fmt}", "eva02 zero-shot")
        with pytest.raises(ValueError, match="holds an EVA-02-CLIP model.*get_clip"):
            get_model(tiny, pretrained=ckpt)
