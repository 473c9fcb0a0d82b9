"""Frozen teachers for EVA-02 pre-training: patch-token targets aligned to the student's patch grid.

The official recipe (EVA-02 `asuka/clip_wrapper.py`, `engine_for_pretraining.py`) regresses the EVA-CLIP
vision tower's final-norm patch tokens through its projection, computed without gradients under
autocast. Supported teachers:
- `Eva02Teacher`: any `Eva02` of ours (zoo weights or a checkpoint file): final-norm patch tokens
  (headless `norm`, or a classifier's `fc_norm` applied per token), optionally through a linear map;
- `ClipTowerTeacher`: the image tower of one of our EVA-02-CLIP models (no open_clip needed);
- `OpenClipTeacher`: an open_clip EVA-CLIP image tower (EVA02-CLIP-B/16, L/14, EVA01-CLIP-g/14, ...),
  i.e. a timm `Eva` trunk whose classifier head is the CLIP projection; `open_clip` is imported lazily.
Teacher and student grids may differ (e.g. a p16 teacher for a p14 student): the teacher's feature map is
resampled to the student grid (area when shrinking, bilinear otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eva02.extras import MissingExtra, need
from eva02.model.vit import Eva02


def align_tokens(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], mode: str = "auto") -> torch.Tensor:
    """Resample patch tokens (B, Hs*Ws, C) on grid `src` to grid `dst` -> (B, Hd*Wd, C).

    `mode` 'auto' averages areas when both sides shrink (each student patch covers several teacher
    patches) and interpolates bilinearly otherwise; 'bilinear', 'bicubic', 'area' force one.
    """
    if tokens.shape[1] != src[0] * src[1]:
        raise ValueError(f"got {tokens.shape[1]} tokens for a {src[0]}x{src[1]} teacher grid")
    if src == dst:
        return tokens
    if mode == "auto":
        mode = "area" if dst[0] <= src[0] and dst[1] <= src[1] else "bilinear"
    B, _, C = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(B, C, *src).float()  # (B, C, Hs, Ws)
    kw = {} if mode == "area" else {"align_corners": False}
    fmap = F.interpolate(fmap, size=dst, mode=mode, **kw)  # (B, C, Hd, Wd)
    return fmap.flatten(2).transpose(1, 2).to(tokens.dtype)


class FrozenTeacher(nn.Module):
    """A frozen network giving per-patch targets; subclasses implement `patch_tokens`.

    `teacher(images, grid)` -> fp32 targets (B, grid_h * grid_w, out_dim), without gradients, in eval
    mode, under autocast on CUDA (`amp_dtype`), with images resized to the teacher's input size if needed.
    """

    def __init__(self, net: nn.Module, out_dim: int, img_size: tuple[int, int] | None, amp_dtype: torch.dtype | None):
        super().__init__()
        self.net = net
        self.out_dim = out_dim
        self.img_size = img_size  # None: the teacher accepts any size divisible by its patch
        self.amp_dtype = amp_dtype
        self.align_mode = "auto"
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval mode: a teacher's dropout and stochastic depth stay off."""
        return super().train(False)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> (patch targets (B, h*w, out_dim), teacher grid (h, w))."""
        raise NotImplementedError

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size the teacher sees for a student input of `size` (its fixed size, if it has one)."""
        return size if self.img_size is None else tuple(self.img_size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = self.input_size(tuple(x.shape[-2:]))
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False)
        amp = x.device.type == "cuda" and self.amp_dtype is not None
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=amp):
            tokens, tgrid = self.patch_tokens(x)
        return align_tokens(tokens.float(), tgrid, tuple(grid), self.align_mode)


class Eva02Teacher(FrozenTeacher):
    """An `Eva02` of ours as teacher: final-norm patch tokens, optionally through `proj`."""

    def __init__(self, model: Eva02, proj: nn.Linear | None = None, amp_dtype: torch.dtype | None = torch.bfloat16):
        net = nn.ModuleDict({"model": model, "proj": proj if proj is not None else nn.Identity()})
        out_dim = proj.out_features if proj is not None else model.cfg.dim
        super().__init__(net, out_dim, None, amp_dtype)

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Any size works; sides that the teacher's patch does not divide are rounded to a multiple of it."""
        p = self.net["model"].cfg.patch_size
        return tuple(max(p, round(s / p) * p) for s in size)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        model: Eva02 = self.net["model"]
        grid = model.grid_of(x)
        tokens = model.forward_features(x)[:, 1:]  # (B, N, D), per-token `norm` for headless models
        if model.is_classifier:
            tokens = model.fc_norm(tokens)  # classifiers have no per-token norm; their pooled LN stands in
        return self.net["proj"](tokens), grid


class ClipTowerTeacher(FrozenTeacher):
    """The image tower of one of our EVA-02-CLIP models (`Eva02Clip.visual`): final-norm patch tokens
    through the tower's projection into the joint space, at the tower's own input size, as open_clip's
    towers give them (`OpenClipTeacher`), without open_clip."""

    def __init__(self, visual: Eva02, amp_dtype: torch.dtype | None = torch.bfloat16):
        if visual.cfg.pool != "token" or not visual.is_classifier:
            raise ValueError("a CLIP tower teacher needs an Eva02 with class-token pooling and a projection head")
        size = (visual.cfg.img_size, visual.cfg.img_size)
        super().__init__(nn.ModuleDict({"model": visual}), visual.cfg.num_classes, size, amp_dtype)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        model: Eva02 = self.net["model"]
        grid = model.grid_of(x)
        tokens = model.forward_features(x)[:, 1:]  # (B, N, D) after the per-token final norm
        return model.head(tokens), grid  # (B, N, E)


class OpenClipTeacher(FrozenTeacher):
    """An open_clip image tower built on a timm ViT trunk (every EVA-CLIP tower in open_clip).

    Targets are the trunk's final-norm patch tokens through the CLIP projection: the trunk's classifier
    head (open_clip's EVA configs have no separate `proj`) or else the tower's own `head`.
    """

    def __init__(self, visual: nn.Module, amp_dtype: torch.dtype | None = torch.bfloat16):
        trunk = getattr(visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "forward_features") or not hasattr(trunk, "patch_embed"):
            raise ValueError(
                f"open_clip tower {type(visual).__name__} is not a timm ViT trunk; use an EVA-CLIP model "
                "(EVA02-B-16, EVA02-L-14, EVA01-g-14, ...)"
            )
        head = trunk.head if isinstance(getattr(trunk, "head", None), nn.Linear) else getattr(visual, "head", None)
        if head is None or not any(True for _ in head.parameters()):
            raise ValueError(f"open_clip tower {type(visual).__name__} has no projection head to map patch tokens")
        out_dim = _out_features(head, trunk.num_features)
        size = getattr(visual, "image_size", None) or trunk.patch_embed.img_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        super().__init__(nn.ModuleDict({"trunk": trunk, "head": head}), out_dim, size, amp_dtype)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        trunk = self.net["trunk"]
        tokens = trunk.forward_features(x)  # (B, prefix + N, W), final norm applied per token
        patches = tokens[:, getattr(trunk, "num_prefix_tokens", 1) :]
        grid = tuple(trunk.patch_embed.grid_size)
        return self.net["head"](patches), grid


def _out_features(head: nn.Module, width: int) -> int:
    with torch.no_grad():
        p = next(head.parameters())
        return head(torch.zeros(1, width, device=p.device, dtype=p.dtype)).shape[-1]


def import_open_clip():
    """The open_clip module, or a clear error saying how to install it."""
    try:
        return need("open_clip", "mim", "an EVA-CLIP teacher")
    except MissingExtra as e:
        raise MissingExtra(f"{e}; or use one of our models as teacher (mim.teacher_kind=eva02)", name=e.name) from None


def build_open_clip_teacher(name: str, pretrained: str = "", amp_dtype: torch.dtype | None = torch.bfloat16):
    """open_clip model `name` (e.g. 'EVA01-g-14') with `pretrained` (a tag or a local file) as a teacher."""
    open_clip = import_open_clip()
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None)
    except RuntimeError as e:  # open_clip reports unknown names and tags as RuntimeError
        raise ValueError(f"open_clip could not build teacher {name!r} with pretrained={pretrained!r}: {e}") from e
    return OpenClipTeacher(model.visual, amp_dtype=amp_dtype)
