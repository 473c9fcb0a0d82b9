"""SyncBatchNorm for segmentation under DDP (`train.sync_bn`, `engine.parallel.sync_batchnorm`): the
conversion turns every BatchNorm of a segmentor into SyncBatchNorm and keeps its tensors; CPU (gloo),
FSDP2 and single-process runs keep plain BatchNorm; the option is checked. On a GPU (marked `gpu`): two
DDP processes normalise with the statistics of their joint batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eva02.engine.config import ConfigError, RunConfig, load_config, override
from eva02.engine.dist import DistInfo
from eva02.engine.parallel import count_batchnorms, parallelize, sync_batchnorm, unwrap
from eva02.model import VARIANTS, Eva02
from eva02.model.seg import Segmentor, SegmentorConfig

ROOT = Path(__file__).resolve().parents[1]


def small(dropout: float = 0.1) -> Segmentor:
    """A 4-block segmentor in the official layout whose BatchNorms hold non-default weights and statistics."""
    torch.manual_seed(0)
    backbone = VARIANTS["test"].replace(img_size=64, patch_size=16, depth=4)
    model = Segmentor(SegmentorConfig(backbone, 5, channels=16, aux_channels=8, dropout=dropout))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


def info(device: str, world: int = 2) -> DistInfo:
    return DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device(device))


def test_every_batchnorm_of_a_segmentor_becomes_sync_and_keeps_its_tensors() -> None:
    model = small().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    n = count_batchnorms(model)
    assert n == 14  # neck fpn1, 4 pooling stages, bottleneck, 3 lateral, 3 fpn, fpn bottleneck, auxiliary
    lines: list[str] = []
    out = sync_batchnorm(model, info("cuda"), "ddp", lines.append)  # a CUDA run's decision; no GPU needed for it
    syncs = [m for m in out.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == n and not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert isinstance(out.decode_head.bottleneck.bn, nn.SyncBatchNorm)
    assert isinstance(out.neck.fpn1[1], nn.SyncBatchNorm) and isinstance(out.auxiliary_head.convs.bn, nn.SyncBatchNorm)
    after = out.state_dict()
    assert list(after) == list(before)  # the same names: checkpoints load either way
    for k, v in before.items():
        assert torch.equal(after[k], v), k
        assert after[k].data_ptr() == ptrs[k], k  # the same tensors, carried over
    assert all(not m.training for m in syncs)  # the mode is kept too
    with torch.no_grad():  # eval mode uses the running statistics: no process group, no GPU involved
        torch.testing.assert_close(out(x), ref, rtol=0, atol=0)
    assert lines == ["train.sync_bn: 14 BatchNorm layers synchronised over 2 processes"]


@pytest.mark.parametrize(
    "device, mode, world, said",
    [
        ("cpu", "ddp", 2, "runs on GPUs only, this run is on cpu"),
        ("cuda", "fsdp", 2, "made for DDP, not train.parallel='fsdp'"),
        ("cuda", "ddp", 1, None),  # one process: nothing to synchronise, nothing to say
        ("cpu", "ddp", 1, None),
    ],
)
def test_no_conversion_where_syncbn_cannot_or_need_not_run(device: str, mode: str, world: int, said) -> None:
    model = small()
    lines: list[str] = []
    out = sync_batchnorm(model, info(device, world), mode, lines.append)
    assert out is model and count_batchnorms(out) == 14
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in out.modules())
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and "14 BatchNorm layers keep per-process statistics" in lines[0] and said in lines[0]


def test_a_model_without_batchnorm_is_left_alone_silently() -> None:
    model = Eva02(VARIANTS["test"])
    lines: list[str] = []
    assert sync_batchnorm(model, info("cuda"), "ddp", lines.append) is model and lines == []


def test_the_option_is_checked_and_on_for_the_ade20k_recipes() -> None:
    assert RunConfig().train.sync_bn is True
    assert override(RunConfig(), {"train.sync_bn": "false"}).train.sync_bn is False
    with pytest.raises(ConfigError, match=r"train\.sync_bn='maybe': expects bool"):
        override(RunConfig(), {"train.sync_bn": "maybe"})
    for name in ("base_upernet_ade20k_512", "large_upernet_ade20k_512", "large_upernet_ade20k_640"):
        assert load_config(ROOT / f"configs/eva02_seg/eva02_{name}.py").train.sync_bn is True


# ------------------------------------------------------------------------------ in processes
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        lines: list[str] = []
        model = parallelize(small(), info("cpu"), "ddp", sync_bn=True, log=lines.append)
        torch.manual_seed(rank)
        logits, aux = model(torch.randn(2, 3, 64, 64), aux=True)  # SyncBatchNorm would raise here on CPU
        (logits.mean() + aux.mean()).backward()
        kinds = sorted({type(m).__name__ for m in unwrap(model).modules() if "BatchNorm" in type(m).__name__})
        torch.save({"lines": lines, "kinds": kinds}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes start and import torch: about 30 s here
def test_a_two_process_cpu_run_trains_with_plain_batchnorm(tmp_path: Path) -> None:
    mp.spawn(_cpu_rank, args=(_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["kinds"] == ["BatchNorm2d"]
        assert len(got["lines"]) == 1 and "runs on GPUs only" in got["lines"][0]


def _gpu_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)  # gloo: both processes may share one GPU
    try:
        model = parallelize(small(dropout=0.0), info("cuda:0"), "ddp", sync_bn=True)
        x = torch.load(f"{out}/x.pt").cuda()[2 * rank : 2 * rank + 2]
        logits = model(x)
        bn = unwrap(model).decode_head.bottleneck.bn
        torch.save({"logits": logits.detach().cpu(), "mean": bn.running_mean.cpu(), "sync": type(bn).__name__},
                   f"{out}/{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_gpu_processes_normalise_with_their_joint_batch(tmp_path: Path) -> None:
    """Each of two DDP processes gets half of a batch of 4; with SyncBatchNorm every layer normalises with
    the statistics of all 4 images, so each half's logits are those of one process on the whole batch."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    mp.spawn(_gpu_rank, args=(_port(), str(tmp_path)), nprocs=2)
    ref = small(dropout=0.0).cuda().train()
    whole = ref(x.cuda()).detach().cpu()
    per_process = small(dropout=0.0).cuda().train()(x[:2].cuda()).detach().cpu()
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    assert {g["sync"] for g in got} == {"SyncBatchNorm"}
    torch.testing.assert_close(torch.cat([g["logits"] for g in got]), whole, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0]["logits"], per_process, atol=1e-3)  # per-process BN would differ
    for g in got:
        torch.testing.assert_close(g["mean"], ref.decode_head.bottleneck.bn.running_mean.cpu(), rtol=1e-4, atol=1e-5)
