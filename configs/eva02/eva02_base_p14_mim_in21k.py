"""EVA-02-B MIM pre-training on ImageNet-21K (official recipe, EVA-02 `asuka/README.md`).

150 epochs, global batch 2048 (4 nodes x 8 GPUs x 64), lr 1.5e-3, drop path 0, otherwise as the tiny
config (AdamW betas (0.9, 0.98), eps 1e-6, wd 0.05, clip 3.0, 1 warmup epoch, cosine to 1e-5, patch
gradient x0.1, 105 of 256 patches masked); teacher EVA01-CLIP-g/14.
Run:  python tools/train.py configs/eva02/eva02_base_p14_mim_in21k.py
"""

from pathlib import Path

from eva02.engine.config import load_config, override

config = override(
    load_config(Path(__file__).with_name("eva02_tiny_p14_mim_in21k.py")),
    {
        "model.name": "base",
        "data.batch_size": 64,
        "optim.lr": 1.5e-3,
        "optim.global_batch": 2048,
        "schedule.epochs": 150,
    },
)
