"""Key table of the official EVA-02 segmentation checkpoints (`EVA-02/seg` on mmsegmentation 0.29:
`eva02_B_ade_seg_upernet_sz512.pth`, `eva02_L_ade_seg_upernet_sz512.pth`, `eva02_L_ade_seg_upernet_sz640.pth`)
for our `Segmentor`.

Those files are mmcv checkpoints ({'meta': ..., 'state_dict': ...}) of an `EncoderDecoder` whose parts
are named as the official code names them:
- `backbone.*`: the `EVA2` ViT in BAAI's layout (separate q/k/v projections, w1/w2 SwiGLU with its
  sub-LN: the OFFICIAL table of `convert.py`), with the RoPE tables as buffers (`backbone.rope.*` and,
  the same module seen from every block, `backbone.blocks.N.attn.rope.*`), and the four resampling
  branches inside the backbone: `fpn1` (deconvolution, SyncBN, GELU, deconvolution), `fpn2` (one
  deconvolution in a Sequential), `fpn3` (identity), `fpn4` (max pooling); ours are `neck.fpn1..4`;
- `decode_head.*`: mmseg's `UPerHead` (`psp_modules.J.1`, `bottleneck`, `lateral_convs.J`, `fpn_convs.J`,
  `fpn_bottleneck`: mmcv ConvModules, `conv` without bias and `bn`; the classifier `conv_seg`);
- `auxiliary_head.*`: mmseg's `FCNHead` with one convolution (`convs.0`) and `conv_seg`.

Every key of such a file is used or named: RoPE tables are dropped (computed, never loaded), anything
else outside the table is an error listing it; a tensor the table expects but the file lacks is an
error too, and the caller's strict load names every tensor of our model left unfilled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from eva02.weights.convert import OFFICIAL, Rule, _applicable, _convert, _match, _prefixed, _rename, fit_to_config

if TYPE_CHECKING:
    from eva02.model.seg import SegmentorConfig

StateDict = dict[str, torch.Tensor]

FORMAT = "EVA-02 seg (mmsegmentation)"
_BB = "backbone."

# The ViT: BAAI's layout of the base and large blocks (the seg releases are B and L), under `backbone.`.
# The final norm and classifier rules go: the seg backbone has neither, so such keys are reported.
_VIT: list[Rule] = [
    r
    for r in _applicable(_prefixed(OFFICIAL, _BB, _BB), "split", "headless")
    if not r.ours[0].startswith(("backbone.norm.", "backbone.fc_norm.", "backbone.head."))
]


def _conv_module(ours: str, theirs: str) -> dict[str, str]:
    """mmcv's ConvModule (conv without bias, then a BatchNorm named `bn`) and our ConvBNReLU: the same
    child names under their own prefixes."""
    return {ours + "conv.weight": theirs + "conv.weight", ours + "bn.{b}": theirs + "bn.{b}"}


_HEADS: list[Rule] = _rename(
    {
        # The four resampling branches: in their backbone, in our neck. fpn1 = deconv (0), SyncBN (1),
        # GELU (2), deconv (3); fpn2 = Sequential(deconv); fpn3 (identity) and fpn4 (max pool) hold nothing.
        "neck.fpn1.0.{p}": "backbone.fpn1.0.{p}",
        "neck.fpn1.1.{b}": "backbone.fpn1.1.{b}",
        "neck.fpn1.3.{p}": "backbone.fpn1.3.{p}",
        "neck.fpn2.{p}": "backbone.fpn2.0.{p}",
        # UperNet: pyramid pooling stages (AdaptiveAvgPool2d, ConvModule), bottleneck, FPN, fusion, classifier.
        **_conv_module("decode_head.psp.stages.{j}.1.", "decode_head.psp_modules.{j}.1."),
        **_conv_module("decode_head.bottleneck.", "decode_head.bottleneck."),
        **_conv_module("decode_head.lateral_convs.{j}.", "decode_head.lateral_convs.{j}."),
        **_conv_module("decode_head.fpn_convs.{j}.", "decode_head.fpn_convs.{j}."),
        **_conv_module("decode_head.fpn_bottleneck.", "decode_head.fpn_bottleneck."),
        "decode_head.cls.conv_seg.{p}": "decode_head.conv_seg.{p}",
        # The FCN auxiliary head: one ConvModule in a Sequential there, the module itself here.
        **_conv_module("auxiliary_head.convs.", "auxiliary_head.convs.0."),
        "auxiliary_head.cls.conv_seg.{p}": "auxiliary_head.conv_seg.{p}",
    }
)

SEG_OFFICIAL: list[Rule] = [*_VIT, *_HEADS]

# Their keys that are not weights: the RoPE tables (the one module under the backbone and every block).
SEG_DROPPED = tuple(f"{where}rope.freqs_{f}" for where in (_BB, _BB + "blocks.{i}.attn.") for f in ("cos", "sin"))


def is_official_seg(sd: StateDict) -> bool:
    """Whether a flat state dict is an official EVA-02 seg model: mmseg's decode head and the backbone's
    own resampling branches (`backbone.fpn1.*`), which no other layout has."""
    return "decode_head.conv_seg.weight" in sd and any(k.startswith(_BB + "fpn1.") for k in sd)


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")


def official_seg_to_ours(
    sd: StateDict, cfg: SegmentorConfig | None = None, where: str = "the checkpoint"
) -> tuple[StateDict, list[str]]:
    """An official EVA-02 seg state dict in our `Segmentor` layout, and their keys not loaded (the RoPE
    tables). With `cfg`, the backbone must be in the official layout (class token, global attention),
    and its patch kernel and position embedding are fitted to `cfg.backbone` as any init weights are.

    Their keys outside the table are an error listing them, as is a table entry only partly there
    (a q projection without its k and v).
    """
    dropped = sorted(k for k in sd if any(_match(k, t) is not None for t in SEG_DROPPED))
    kept = {k: v for k, v in sd.items() if k not in dropped}
    theirs = [t for r in SEG_OFFICIAL for t in r.theirs if t is not None]
    unknown = [k for k in kept if not any(_match(k, t) is not None for t in theirs)]
    if unknown:
        raise ValueError(
            f"{where}: keys of no part of an official EVA-02 seg model (UperNet on the base or large "
            f"backbone): {_shown(unknown)}"
        )
    out = _convert(kept, SEG_OFFICIAL, "theirs", "ours", FORMAT)
    if cfg is not None:
        bb = cfg.backbone
        if not bb.cls_token or bb.window_size:
            raise ValueError(
                f"{where} is an official EVA-02 seg model, whose backbone keeps the class token and attends "
                "globally: use it with seg.window_size=0 and seg.cls_token=true"
            )
        vit = fit_to_config({k[len(_BB) :]: v for k, v in out.items() if k.startswith(_BB)}, bb)
        out = {**{k: v for k, v in out.items() if not k.startswith(_BB)}, **{_BB + k: v for k, v in vit.items()}}
    return out, dropped
