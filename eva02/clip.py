"""EVA-02-CLIP for users: load, tokenize, zero-shot classifiers, ImageNet prompts.

    clip = eva02.get_clip("EVA02-CLIP-B-16", pretrained=True)
    ids = eva02.clip.tokenize(["a photo of a cat", "a photo of a dog"])
    head = eva02.zero_shot_classifier(clip, ["cat", "dog"], ["a photo of a {}."])  # (E, 2)
    probs = (100 * clip.encode_image(images, normalize=True) @ head).softmax(-1)

Tokenization is CLIP's byte-level BPE as open_clip implements it (its `SimpleTokenizer`, whose
vocabulary ships inside the open_clip wheel): the tokenizer these weights were trained with, so ids
match open_clip's by construction rather than by a re-implementation. It is the `clip` extra.
The ImageNet class names and the 80 prompt templates of `--imagenet` are open_clip's copies of the
ones OpenAI published with CLIP.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from eva02.extras import need
from eva02.model.clip import ClipConfig, Eva02Clip  # noqa: F401 (part of this module's API)
from eva02.weights.clip import CLIP_ZOO, find_clip, get_clip, list_clip_models, resolve_clip  # noqa: F401

CONTEXT_LENGTH = 77


@functools.cache
def _tokenizer(context_length: int):
    tok = need("open_clip.tokenizer", "clip", "CLIP tokenization")
    return tok.SimpleTokenizer(context_length=context_length)


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids (N, context_length), int64: start token, BPE tokens, end token, zero padding. Longer
    texts are cut to fit, keeping the end token (whose position the text tower pools)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    odd = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if odd is not None:
        raise TypeError(f"tokenize takes strings; item {odd} is {type(texts[odd]).__name__}: {texts[odd]!r:.60}")
    return _tokenizer(context_length)(texts)


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names in the form CLIP prompts use ('tench', 'goldfish', ...)."""
    meta = need("open_clip.zero_shot_metadata", "clip", "the ImageNet class names")
    return list(meta.IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[str]:
    """The 80 prompt templates ('a bad photo of a {}.', ...) of CLIP's ImageNet evaluation."""
    meta = need("open_clip.zero_shot_metadata", "clip", "the ImageNet prompt templates")
    return [t("{}") if callable(t) else t for t in meta.OPENAI_IMAGENET_TEMPLATES]


@torch.no_grad()
def zero_shot_classifier(
    clip: Eva02Clip,
    class_names: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}.",),
    batch_size: int = 256,
) -> torch.Tensor:
    """The (E, C) head of a zero-shot classifier: per class, the mean of the normalised text embeddings
    of its prompts (each template with `{}` replaced by the class name), normalised again.

    `encode_image(x, normalize=True) @ head` gives cosine similarities; times `clip.logit_scale.exp()`
    (about 100) they are the logits CLIP was trained with. A single string is one class name or one
    template (not a sequence of one-letter ones).
    """
    class_names = [class_names] if isinstance(class_names, str) else list(class_names)
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not class_names:
        raise ValueError("zero_shot_classifier needs at least one class name")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"every template needs a '{{}}' where the class name goes; got {bad or 'none'}")
    device = next(clip.parameters()).device
    prompts = [t.format(c) for c in class_names for t in templates]
    ids = tokenize(prompts)
    emb = torch.cat(
        [clip.encode_text(ids[i : i + batch_size].to(device), normalize=True) for i in range(0, len(ids), batch_size)]
    )  # (C*T, E)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, E)
    return torch.nn.functional.normalize(emb, dim=-1).T.contiguous()  # (E, C)
