"""The one vocabulary of compute precision (`eva02.dtypes`): its words and torch dtypes, the older
spelling it still reads, and the same words in the API, the run config, the CLI and the benchmarks."""

from __future__ import annotations

import pytest
import torch

from eva02 import dtypes
from eva02.dtypes import DTYPES, FULL, autocast, autocast_dtype, canonical, torch_dtype


def test_words_and_their_torch_dtypes() -> None:
    assert DTYPES == ("fp32", "bf16", "fp16") and FULL == "fp32"
    assert [torch_dtype(w) for w in DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    assert [autocast_dtype(w) for w in DTYPES] == [None, torch.bfloat16, torch.float16]
    assert autocast_dtype(None) is None  # no word: full precision


def test_older_spelling_is_read_and_others_refused() -> None:
    assert canonical("none") == "fp32" and canonical(None) == "fp32"
    assert all(canonical(w) == w for w in DTYPES)
    for bad in ("fp8", "float32", "BF16", "", 16):
        with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16"):
            canonical(bad)


def test_autocast_is_off_for_full_precision_even_inside_another() -> None:
    with autocast("cpu", autocast_dtype("bf16")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with autocast("cpu", autocast_dtype("fp32")):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_run_config_holds_the_word_for_the_older_spelling() -> None:
    from eva02.engine.config import RunConfig, TrainCfg, changed_keys, override

    assert TrainCfg().amp == "fp32"
    assert TrainCfg(amp="none").amp == "fp32"
    cfg = override(RunConfig(), {"train.amp": "none"})
    assert cfg.train.amp == "fp32"
    # A checkpoint saved with the older word did not run at another precision.
    assert "train.amp" not in changed_keys({"train": {"amp": "none"}}, cfg)
    assert "train.amp" in changed_keys({"train": {"amp": "bf16"}}, cfg)
    with pytest.raises(ValueError, match="train.amp='fp8': expects one of 'fp32', 'bf16', 'fp16'"):
        TrainCfg(amp="fp8")


def test_every_user_of_the_words_takes_the_same_ones() -> None:
    from eva02.cli import bench as cli_bench
    from eva02.cli import build_parser
    from eva02.inference import AUTOCAST_DTYPES, Predictor
    from eva02.model import VARIANTS, Eva02

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and "predict" in a.choices]
    for command in ("predict", "features", "bench", "train", "test"):
        (action,) = [a for a in sub.choices[command]._actions if "--dtype" in a.option_strings]
        assert tuple(action.choices) == DTYPES, command
    assert set(AUTOCAST_DTYPES) == {None, *DTYPES}
    p = Predictor(Eva02(VARIANTS["test"].replace(num_classes=3)), device="cpu")
    for word, expected in [*((w, autocast_dtype(w)) for w in ("fp32", "bf16", "none")), (None, None)]:
        p.set_dtype(word)
        assert p.autocast_dtype == expected, word
    assert cli_bench.load_harness().DTYPES is dtypes.DTYPES  # benchmarks/eva02_bench of this checkout
