"""One vocabulary for every command: -m/--model, --checkpoint, -o/--out with --force, -b/--batch-size and
--dtype wherever they apply, older spellings still accepted but left out of the help; parsing without
torch; zoo names matched by part and suggested when mistyped; argparse errors in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eva02.cli import CliError, build_parser, main

REPO = Path(__file__).resolve().parents[1]
TINY = "eva02-tiny-p14_in21k-pre_3rdparty_in1k"

# command -> the shared options it must have
MODEL = ("predict", "features", "convert", "export", "info", "bench")
CHECKPOINT = ("predict", "features", "export")
OUT = ("predict", "features", "convert", "export", "bench", "test", "plot", "mask-demo")
BATCH = ("predict", "features", "train", "test", "bench")
DTYPE = ("predict", "features", "train", "test", "bench")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO, timeout=300
    )


# ------------------------------------------------------------------------------- the same words everywhere
@pytest.mark.parametrize(
    "commands, flags",
    [
        (MODEL, {"-m", "--model"}),
        (CHECKPOINT, {"--checkpoint"}),
        (OUT, {"-o", "--out", "--force"}),
        (BATCH, {"-b", "--batch-size"}),
        (DTYPE, {"--dtype"}),
    ],
)
def test_every_command_takes_the_shared_options(commands, flags) -> None:
    subs = subparsers()
    for command in commands:
        assert flags <= options(subs[command]), (command, flags - options(subs[command]))


@pytest.mark.parametrize("command", DTYPE)
def test_dtype_takes_the_same_three_names(command) -> None:
    (action,) = [a for a in subparsers()[command]._actions if "--dtype" in a.option_strings]
    assert tuple(action.choices) == ("fp32", "bf16", "fp16")


@pytest.mark.parametrize(
    "command, hidden",
    [("predict", "--amp"), ("train", "--amp"), ("test", "--amp"), ("bench", "--batch "), ("bench", "--json")],
)
def test_older_spellings_work_but_are_not_shown(command, hidden) -> None:
    text = subparsers()[command].format_help()
    assert hidden not in text
    assert "--dtype" in text or "--batch-size" in text


@pytest.mark.parametrize(
    "old, new, field, value",
    [
        (["predict", "--amp"], ["predict", "--dtype", "bf16"], "dtype", "bf16"),
        (["train", "c.py", "--amp"], ["train", "c.py", "--dtype", "bf16"], "amp", "bf16"),
        (["train", "c.py", "--amp", "none"], ["train", "c.py", "--dtype", "fp32"], "amp", "none"),
        (["test", "c.py", "k.pt", "--amp", "fp16"], ["test", "c.py", "k.pt", "--dtype", "fp16"], "amp", "fp16"),
        (["test", "c.py", "k.pt", "--batch-size", "8"], ["test", "c.py", "k.pt", "-b", "8"], "batch_size", 8),
        (["bench", "--batch", "4"], ["bench", "-b", "4"], "batch", 4),
        (["bench", "--models", "test-56"], ["bench", "-m", "test-56"], "models", ["test-56"]),
        (["bench", "--json", "r.json"], ["bench", "-o", "r.json"], "out", "r.json"),
        (["export", TINY, "--format", "onnx", "-o", "x"], ["export", "-m", TINY, "--format", "onnx", "-o", "x"],
         "model", TINY),
        (["info", TINY], ["info", "--model", TINY], "model", TINY),
        (["convert", "a.pt", "b.safetensors", "-m", TINY], ["convert", "a.pt", "-o", "b.safetensors", "-m", TINY],
         "out", "b.safetensors"),
    ],
)  # fmt: skip
def test_old_and_new_spellings_mean_the_same(old, new, field, value) -> None:
    from eva02.cli.convert import output_path
    from eva02.cli.options import model_arg

    def read(ns: argparse.Namespace):
        if field == "model":
            return model_arg(ns)
        if field == "out" and ns.command == "convert":
            return str(output_path(ns))
        return getattr(ns, field)

    assert read(parse(*old)) == read(parse(*new)) == value


def test_train_dtype_and_batch_size_set_the_config(tmp_path) -> None:
    from eva02.cli.train import _resolve

    cfg_file = str(REPO / "configs" / "eva02" / "eva02_tiny_p14_8xb16_in1k.py")
    cfg, _, _ = _resolve(parse("train", cfg_file, "--dtype", "fp32", "-b", "8"))
    assert cfg.train.amp == "fp32" and cfg.data.batch_size == 8
    # the last word wins, as with two --set of the same field
    cfg, _, _ = _resolve(parse("train", cfg_file, "-b", "8", "--set", "data.batch_size=4", "--dtype", "bf16"))
    assert cfg.train.amp == "bf16" and cfg.data.batch_size == 4


def test_two_different_spellings_of_one_input_are_refused(capsys) -> None:
    assert main(["info", TINY, "-m", "eva02-small-p14_in21k-pre_3rdparty_in1k"]) == 2
    assert "two model names given" in capsys.readouterr().err
    assert main(["convert", "a.pt", "b.safetensors", "-o", "c.safetensors", "-m", TINY]) == 2
    assert "two outputs given" in capsys.readouterr().err
    assert main(["convert", "a.pt", "-m", TINY]) == 2
    assert "give -o/--out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ quick start
def test_parser_and_every_help_page_without_torch() -> None:
    proc = run_python(
        """
        import contextlib, io, sys
        import eva02.cli
        parser = eva02.cli.build_parser()
        names = [n for a in parser._actions if a.choices for n in a.choices]
        for name in names + [None]:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                eva02.cli.main([name, "-h"] if name else ["-h"])
        heavy = [m for m in ("torch", "numpy", "PIL") if m in sys.modules]
        assert not heavy, heavy
        print(len(names))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 11


def test_list_without_torch() -> None:
    proc = run_python(
        """
        import contextlib, io, sys
        import eva02.cli
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert eva02.cli.main(["list", "tiny"]) == 0
        assert "eva02-tiny-p14_in21k-pre_3rdparty_in1k" in out.getvalue()
        print("torch" in sys.modules)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------- zoo names
def test_list_matches_a_part_of_a_name_or_alias_and_globs(capsys) -> None:
    def names(*argv: str) -> list[str]:
        assert main(["list", *argv]) == 0
        return [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]]

    tiny = names("tiny")
    assert tiny == ["eva02-tiny-p14_in21k-pre_3rdparty_in21k", TINY]
    assert names("TINY") == names("*tiny*") == tiny
    assert names("patch14_336") == [TINY, "eva02-small-p14_in21k-pre_3rdparty_in1k"]  # timm aliases
    assert names("eva02-large*p16*") == [
        "eva02-large-p16_in21k-pre_3rdparty_in21k",
        "eva02-large-p16_m38m-pre_3rdparty_m38m",
    ]
    assert main(["list", "gigantic"]) == 1
    assert "no model name contains or matches 'gigantic'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("eva02-tinny", ["eva02-tiny-p14_in21k-pre_3rdparty_in21k", TINY]),  # a typo
        (TINY + "x", [TINY]),
        ("m38m-pre_3rdparty_in1k", ["eva02-large-p14_m38m-pre_3rdparty_in1k"]),  # a part
        ("foo", []),
    ],
)
def test_unknown_name_suggests_close_names_in_one_line(typed, expected, capsys) -> None:
    assert main(["info", typed]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"eva02 info: error: unknown model name '{typed}'")
    if expected:
        close = err.split("closest: ")[1].split(" (")[0].strip().split(", ")
        assert close[: len(expected)] == expected and len(close) <= 3  # the best first
    else:
        assert "no zoo name is close" in err and "`eva02 list`" in err


def test_unknown_name_in_every_model_command(capsys, tmp_path) -> None:
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    for argv in (
        ["predict", str(img), "-m", "eva02-tinny"],
        ["features", str(img), "-m", "eva02-tinny", "-o", str(tmp_path / "f.npy")],
        ["export", "-m", "eva02-tinny", "--format", "torchscript", "-o", str(tmp_path / "m.ts")],
        ["convert", str(img), "-m", "eva02-tinny", "-o", str(tmp_path / "c.safetensors")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unknown model name 'eva02-tinny'; closest: eva02-tiny-p14" in err, err
    assert not [p.name for p in tmp_path.iterdir() if p.name != "x.png"]


def test_bench_takes_zoo_names() -> None:
    from types import SimpleNamespace

    from eva02.cli.bench import SIZE_NAMES, add_sizes, load_harness, size_names

    bench = load_harness()
    assert SIZE_NAMES.split() == list(bench.SIZES)  # the help's list is the real one
    assert size_names([TINY, "base-448", "eva02-base-p14_in21k-pre_in21k-medft_3rdparty_in1k"]) == [
        "tiny-336",
        "base-448",
    ]
    assert size_names(["eva02_small_patch14_224.mim_in22k"]) == ["small-224"]  # a headless model, at 224
    harness = SimpleNamespace(SIZES=dict(bench.SIZES), BenchSize=bench.BenchSize)  # the real table stays as it is
    add_sizes(["small-224", "tiny-336"], harness)
    assert harness.SIZES["small-224"] == bench.BenchSize("small", 224, bench.SIZES["small-336"].batch)
    assert harness.SIZES["tiny-336"] is bench.SIZES["tiny-336"] and len(harness.SIZES) == len(bench.SIZES) + 1
    with pytest.raises(CliError, match="patch-14 models only .*time eva02-base-p14_in21k-pre_3rdparty_in21k instead"):
        size_names(["eva02-base-p16_in21k-pre_3rdparty_in21k"])
    with pytest.raises(CliError, match="unknown size 'huge-999' in --model; choose from test-56"):
        size_names(["huge-999"])


# --------------------------------------------------------------------------------- errors in one line
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["predict", "--frob"], "eva02 predict: error: unrecognized arguments: --frob; see `eva02 predict -h`"),
        (["train", "c.py", "-b", "0"], "eva02 train: error: argument -b/--batch-size: must be 1 or more, got 0"),
        (["bench", "--batch", "x"], "eva02 bench: error: argument --batch: expects a whole number, got 'x'"),
        (["test", "c.py"], "eva02 test: error: the following arguments are required: CKPT"),
        (["predict", "--dtype", "fp64"], "eva02 predict: error: argument --dtype: invalid choice: 'fp64'"),
    ],
)
def test_argument_errors_are_one_line(argv, expected, capsys) -> None:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(expected), err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["info", TINY, "--img-size", "100"], f"--img-size 100 must be a multiple of {TINY}'s patch size 14, e.g. 98"),
        (["info"], "give -m/--model NAME"),
        (["bench", "--rounds", "0"], "--rounds must be 1 or more, got 0"),
        (["bench", "-m", "test-56", "--warmup", "-1"], "--warmup must be 0 or more, got -1"),
        (["mask-demo", "x.png", "-o", "m.png", "--num-masking", "999"], "--num-masking must be between 0 and 256"),
        (["mask-demo", "x.png", "-o", "m.png", "--min-num", "0"], "--min-num must be 1 or more, got 0"),
    ],
)
def test_messages_name_the_flags_as_typed(argv, expected, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert "=" not in err.replace("--", "") and "Config" not in err and "Generator" not in err
