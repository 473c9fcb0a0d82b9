"""The model side of serving an EVA-02-CLIP model: image and text embeddings, zero-shot scores.

`ClipRunner` is a `ModelRunner` whose image model is the CLIP image tower (`clip.visual`), so uploads
are decoded, preprocessed and explained as for any model. Its batch kinds are 'embed-image' (images ->
`clip.encode_image(x, normalize=True)`) and 'embed-text' (token ids of one request each -> their
`clip.encode_text(ids, normalize=True)`, all requests of a batch encoded together in chunks). A zero-shot
request is one of each: its labels' prompts as an 'embed-text' item (once per label set, see
clip_routes.HeadCache), reduced to a classifier head exactly as `eva02.clip.zero_shot_classifier`
does, and its image as an 'embed-image' item, shared with /v1/embed/image; the softmax of the scaled
cosine similarities (`clip.logit_scale.exp()`, as CLIP was trained) gives the scores.

Explanations: attention rollout on the image tower. Grad-CAM needs the logit of a class of a
classifier head, which a CLIP model has not, so it is refused (a zero-shot head could stand in, but
its maps would explain the labels of one request, not the model). Attention rollout is offered only
for towers whose blocks `eva02.explain` recomputes (pre-norm with RoPE: B and L, not the post-norm E).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eva02.dtypes import autocast
from eva02.model.clip import Eva02Clip
from eva02.model.config import Eva02Config
from eva02.serve.runner import EXPLAIN, ModelRunner
from eva02.weights.zoo import Preprocess

CLIP_KINDS = ("zero-shot", "embed-image", "embed-text")
TEXT_CHUNK = 256  # prompts per text-tower call within a batch (zero_shot_classifier's default)
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def rollout_supported(cfg: Eva02Config) -> bool:
    """Whether `eva02.explain` recomputes this tower's attention: pre-norm blocks with RoPE."""
    return cfg.rope and not cfg.post_norm


class ClipRunner(ModelRunner):
    """An EVA-02-CLIP model with its image preprocessing: what the server's batches call."""

    def __init__(self, clip: Eva02Clip, preprocess: Preprocess, *, name: str, dtype: str | None = None) -> None:
        self._set_up(clip.visual, preprocess, name, dtype)
        self.clip = clip.eval()
        self.predictor = None
        self.scale = float(clip.logit_scale.detach().float().exp())  # the factor of the cosine similarities
        self.context_length = clip.cfg.text.context_length

    @property
    def kinds(self) -> tuple[str, ...]:
        return CLIP_KINDS

    @property
    def explain_methods(self) -> tuple[str, ...]:
        return ("attention-rollout",) if rollout_supported(self.model.cfg) else ()

    def refusal(self, kind: str) -> str:
        if kind == "features":
            return f"model '{self.name}' is an EVA-02-CLIP model: its image embedding is POST /v1/embed/image"
        return (
            f"model '{self.name}' is an EVA-02-CLIP model without a classifier head: "
            "classify with your own labels at POST /v1/zero-shot"
        )

    def explain_refusal(self, method: str) -> str | None:
        if method in self.explain_methods:
            return None
        if method == "gradcam":
            return (
                f"model '{self.name}' is an EVA-02-CLIP model: Grad-CAM explains a class of a classifier "
                "head, which it has not; use method=attention-rollout"
            )
        return (
            f"model '{self.name}' has no attention rollout here: eva02.explain does not recompute the "
            "attention of its post-norm image blocks without RoPE"
        )

    def info(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "img_size": self.img_size,
            "num_classes": 0,
            "embedding_dim": self.clip.embed_dim,
            "device": str(self.device),
            "dtype": self.dtype,
            "kinds": list(self.kinds),
            "explain_methods": list(self.explain_methods),
            "context_length": self.context_length,
            "logit_scale_exp": round(self.scale, 6),
            "default_templates": list(DEFAULT_TEMPLATES),
        }

    # ------------------------------------------------------------------------------ per request
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> token ids (N, context_length); longer texts are cut to the context (`eva02.clip.tokenize`)."""
        return self.clip.tokenize(list(texts))

    def head(self, prompt_embeddings: np.ndarray, num_labels: int) -> np.ndarray:
        """Normalised prompt embeddings (C*T, E), label-major -> the zero-shot head (E, C) float32:
        `eva02.clip.zero_shot_classifier`'s reduction (per label the mean of its prompts, normalised)."""
        emb = torch.from_numpy(prompt_embeddings).view(num_labels, -1, prompt_embeddings.shape[-1])  # (C, T, E)
        head = torch.nn.functional.normalize(emb.mean(dim=1), dim=-1).T  # (E, C)
        return head.contiguous().numpy()

    def scores(self, embedding: np.ndarray, head: np.ndarray) -> np.ndarray:
        """A normalised image embedding (E,) and a head (E, C) -> label probabilities (C,) float32."""
        logits = self.scale * (torch.from_numpy(embedding) @ torch.from_numpy(head))  # (C,)
        return logits.softmax(dim=-1).numpy()

    def zero_shot_json(self, probs: np.ndarray, labels: Sequence[str], topk: int) -> dict[str, Any]:
        """Label probabilities (C,) -> the record of /v1/classify, with the labels as the classes."""
        order = np.argsort(-probs, kind="stable")[: min(max(int(topk), 1), len(labels))]
        best = int(order[0])
        return {
            "model": self.name,
            "pred_label": best,
            "pred_class": labels[best],
            "pred_score": round(float(probs[best]), 6),
            "topk": [{"label": int(i), "class": labels[i], "score": round(float(probs[i]), 6)} for i in order],
        }

    def texts_json(self, embeddings: np.ndarray) -> dict[str, Any]:
        return {"model": self.name, "dim": int(embeddings.shape[-1]), "embeddings": embeddings.tolist()}

    # -------------------------------------------------------------------------------- per batch
    def run(self, kind: str, items: list) -> list:
        """One model call for a batch: 'embed-image' takes preprocessed images and gives one normalised
        embedding (E,) each; 'embed-text' takes token ids (N_i, L) and gives (N_i, E) each;
        'explain:<method>' as for any model."""
        if kind.startswith(EXPLAIN):
            return self.explain(kind[len(EXPLAIN) :], items)
        if kind == "embed-image":
            return list(self.encode_images(torch.stack(items)))  # (B, 3, S, S) -> B x (E,)
        if kind == "embed-text":
            return self.encode_texts(items)
        raise ValueError(f"unknown kind {kind!r}; one of embed-image, embed-text, {EXPLAIN}<method>")

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed images (B, 3, S, S) -> normalised image embeddings (B, E) float32."""
        x = batch.to(self.device, non_blocking=True)
        with self._autocast():
            emb = self.clip.encode_image(x, normalize=True)  # (B, E)
        return emb.float().cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, ids: list[torch.Tensor]) -> list[np.ndarray]:
        """Token ids of each request [(N_i, L)] -> normalised text embeddings [(N_i, E)] float32,
        encoded together in chunks of TEXT_CHUNK prompts."""
        flat = torch.cat(ids)  # (sum N_i, L)
        parts = []
        with self._autocast():
            for start in range(0, len(flat), TEXT_CHUNK):
                chunk = flat[start : start + TEXT_CHUNK].to(self.device, non_blocking=True)
                parts.append(self.clip.encode_text(chunk, normalize=True).float())  # (n, E)
        emb = torch.cat(parts).cpu().numpy()
        return np.split(emb, np.cumsum([len(t) for t in ids])[:-1])

    def _autocast(self):
        dt = self.autocast_dtype
        return autocast(self.device.type, dt)

    def warm_up(self) -> None:
        """One image and one text through the model before traffic (the tokenizer loads here too)."""
        self.run("embed-image", [torch.zeros(3, self.img_size, self.img_size)])
        self.run("embed-text", [self.tokenize([DEFAULT_TEMPLATES[0].format("cat")])])
