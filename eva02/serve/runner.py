"""The model side of the server: decode an upload, run a batch, shape the JSON answers.

Uploads are read by the package's one image loader (`eva02.data.images.load_image`), so the server
accepts exactly the files `eva02 predict` accepts and refuses the others with the same reasons (empty,
not an image, truncated or corrupt, too many pixels). That loader reads paths, so the bytes are handed
to it as an in-memory file (`os.memfd_create`; a temporary file where there is none). Classification
goes through `Predictor` (the same probabilities and top-k as `eva02 predict`); embeddings are
`extract_feat(out_type='avg_featmap')`, the default of `eva02 features`. Explanations
(`explain:<method>` batches) are `eva02.explain`'s maps, drawn over the image region the model saw.
A runner lists the route kinds it computes; for the others it says why not (`refusal`), and the
routes answer 400 with that line. The EVA-02-CLIP runner is `eva02.serve.clip.ClipRunner`.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from eva02 import explain
from eva02.data.images import ImageError, load_image
from eva02.data.transforms import eval_transform
from eva02.dtypes import autocast
from eva02.inference import AUTOCAST_DTYPES, Predictor
from eva02.model.vit import Eva02
from eva02.weights.zoo import Preprocess

KINDS = ("classify", "features")
EXPLAIN = "explain:"  # + a method of eva02.explain.METHODS: the kind of an explanation batch
VIEW_SIDE = 512  # longest side of an explanation drawing


@contextlib.contextmanager
def bytes_as_file(data: bytes) -> Iterator[str]:
    """A path whose file holds `data`, for as long as the block runs (in memory where the OS allows)."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("eva02-upload", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
            yield f"/proc/self/fd/{fd}"  # opening this starts a new read at offset 0
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="eva02-upload-", delete=False) as f:
        f.write(data)
    try:
        yield f.name
    finally:
        os.unlink(f.name)


class ModelRunner:
    """A loaded model with its preprocessing: what the server's batches call."""

    def __init__(
        self,
        model: Eva02,
        preprocess: Preprocess,
        *,
        name: str,
        dtype: str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self._set_up(model, preprocess, name, dtype)
        self.predictor = (
            Predictor(model, preprocess=preprocess, dtype=dtype, class_names=class_names)
            if model.is_classifier
            else None
        )

    def _set_up(self, model: Eva02, preprocess: Preprocess, name: str, dtype: str | None) -> None:
        """What every runner has: the image model (eval mode), its device, precision and preprocessing."""
        if dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(k for k in AUTOCAST_DTYPES if k)}, got {dtype!r}")
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        if dtype == "fp16" and self.device.type != "cuda":
            raise ValueError("dtype 'fp16' needs a CUDA device; on CPU use 'bf16' or 'fp32'")
        self.dtype = dtype or "fp32"
        self.autocast_dtype = AUTOCAST_DTYPES[dtype]
        self.img_size = preprocess.img_size
        self.preprocess = preprocess
        self.transform = eval_transform(preprocess)

    @property
    def kinds(self) -> tuple[str, ...]:
        """What this model can compute: features always, classes when it has a head."""
        return KINDS if self.predictor is not None else ("features",)

    @property
    def explain_methods(self) -> tuple[str, ...]:
        """The explanations this model gives: Grad-CAM needs a head, attention rollout does not."""
        return explain.METHODS if self.predictor is not None else ("attention-rollout",)

    def refusal(self, kind: str) -> str:
        """Why this model does not compute `kind` (one of the route kinds it does not list), in one line."""
        if kind == "classify":
            return f"model '{self.name}' has no classifier head (a pre-trained backbone); use POST /v1/features"
        return (
            f"model '{self.name}' is not an EVA-02-CLIP model (it has no text tower): zero-shot and "
            "/v1/embed/* need one (eva02 serve -m EVA02-CLIP-B-16); its image embedding is POST /v1/features"
        )

    def explain_refusal(self, method: str) -> str | None:
        """Why this model gives no `method` explanation, or None when it gives one."""
        if method in self.explain_methods:
            return None
        return f"model '{self.name}' has no classifier head, so no Grad-CAM; use method=attention-rollout"

    def info(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "img_size": self.img_size,
            "num_classes": self.model.cfg.num_classes,
            "embedding_dim": self.model.num_features,
            "device": str(self.device),
            "dtype": self.dtype,
            "kinds": list(self.kinds),
            "explain_methods": list(self.explain_methods),
        }

    # ------------------------------------------------------------------------------ per request
    def decode(self, data: bytes, name: str) -> torch.Tensor:
        """Upload bytes -> preprocessed image (3, S, S); ImageError naming `name` and the reason."""
        return self._decode(data, name)[0]

    def decode_view(self, data: bytes, name: str) -> tuple[torch.Tensor, Image.Image]:
        """Upload bytes -> (preprocessed image (3, S, S), the region the model sees, at most VIEW_SIDE px)."""
        x, img = self._decode(data, name)
        view = explain.model_view(img, self.preprocess)
        view.thumbnail((VIEW_SIDE, VIEW_SIDE), Image.Resampling.BICUBIC)
        return x, view

    def _decode(self, data: bytes, name: str) -> tuple[torch.Tensor, Image.Image]:
        with bytes_as_file(data) as path:
            try:
                img = load_image(path)
            except ImageError as e:
                raise ImageError(str(e).replace(f"'{path}'", f"'{name}'")) from None
        try:
            return self.transform(img), img
        except Exception as e:  # a transform failure is the image's problem too (e.g. a 0-pixel side)
            raise ImageError(f"cannot preprocess image '{name}': {type(e).__name__}: {e}") from None

    @staticmethod
    def overlay_png(view: Image.Image, heat: np.ndarray) -> bytes:
        """A map (h, w) in [0, 1] drawn over the image region the model saw, as PNG bytes."""
        buf = io.BytesIO()
        explain.overlay(view, heat, max_side=VIEW_SIDE).save(buf, format="PNG")
        return buf.getvalue()

    def classify_json(self, probs: np.ndarray, topk: int) -> dict[str, Any]:
        """One image's probabilities (C,) -> the record of `eva02 predict --json`, with the model name."""
        res = self.predictor.result(probs, topk)
        return {
            "model": self.name,
            "pred_label": res["pred_label"],
            "pred_class": res["pred_class"],
            "pred_score": round(res["pred_score"], 6),
            "topk": [{"label": lab, "class": cls, "score": round(s, 6)} for lab, cls, s in res["topk"]],
        }

    def features_json(self, embedding: np.ndarray) -> dict[str, Any]:
        return {"model": self.name, "dim": int(embedding.shape[-1]), "embedding": embedding.tolist()}

    # -------------------------------------------------------------------------------- per batch
    def run(self, kind: str, images: list) -> list:
        """One model call for a batch of preprocessed images -> one float32 row per image:
        class probabilities (C,) for 'classify', the pooled embedding (D,) for 'features'.
        'explain:<method>' takes (image, target class or None) pairs and gives (map (h, w) in [0, 1],
        the class explained or None) pairs."""
        if kind.startswith(EXPLAIN):
            return self.explain(kind[len(EXPLAIN) :], images)
        batch = torch.stack(images)  # (B, 3, S, S)
        if kind == "classify":
            out = self.predictor.probabilities(batch)  # (B, C)
        elif kind == "features":
            out = self.embed(batch)  # (B, D)
        else:
            raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
        return list(out)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed images (B, 3, S, S) -> pooled, normalised features (B, D) float32."""
        dt = self.autocast_dtype
        x = batch.to(self.device, non_blocking=True)
        with autocast(self.device.type, dt):
            (feats,) = self.model.extract_feat(x, out_type="avg_featmap", out_indices=(-1,))  # (B, D)
        return feats.float().cpu().numpy()

    def explain(self, method: str, items: list[tuple[torch.Tensor, int | None]]) -> list[tuple[np.ndarray, int | None]]:
        """Explanation maps for (image, target) pairs: one model call for the batch, in float32."""
        batch = torch.stack([x for x, _ in items]).to(self.device)  # (B, 3, S, S)
        targets = [t for _, t in items] if method == "gradcam" else None  # None in the list: the top class
        maps, classes = explain.explain(self.model, batch, method, targets)
        maps = maps.cpu().numpy()
        return [(maps[i], None if classes is None else int(classes[i])) for i in range(len(items))]

    def warm_up(self) -> None:
        """One call of each kind on a blank image: first-call costs (allocations, kernels) before traffic."""
        blank = torch.zeros(3, self.img_size, self.img_size)
        for kind in self.kinds:
            self.run(kind, [blank])
