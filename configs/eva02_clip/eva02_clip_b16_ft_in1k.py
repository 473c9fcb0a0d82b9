"""EVA02-CLIP-B/16 fine-tuned on ImageNet-1k at 224 px, starting from the zero-shot classifier: the
image tower's weights, and as head its projection folded with the zero-shot head of the 1000 class
names and 80 prompts (so step 0 predicts the zero-shot labels, 74.7 top-1 reported).

The optimisation settings are the EVA-02-B fine-tuning recipe (eva02/eva02_base_p14_8xb16_in1k.py:
AdamW, layer decay 0.7, lr 1e-4 at batch 1024, RandAugment, EMA) at 224 px; BAAI publish no CLIP
fine-tuning recipe for these models, so treat them as a starting point, not a reproduction.
`model.init` is 'pretrained' (the zoo's download) or a CLIP file of any format.

Train:  python tools/train.py configs/eva02_clip/eva02_clip_b16_ft_in1k.py
Test:   python tools/test.py configs/eva02_clip/eva02_clip_b16_ft_in1k.py CHECKPOINT
"""

from pathlib import Path

from eva02.engine.config import load_config, override

config = override(
    load_config(Path(__file__).parents[1] / "eva02" / "eva02_base_p14_8xb16_in1k.py"),
    {
        "model.name": "EVA02-CLIP-B-16",
        "model.init": "pretrained",
        "model.img_size": 224,
        "clip.class_names": "imagenet",
        "clip.templates": "imagenet",
    },
)
