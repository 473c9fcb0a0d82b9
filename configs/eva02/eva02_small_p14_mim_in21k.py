"""EVA-02-S MIM pre-training on ImageNet-21K (official recipe): as the tiny config, with the small student.

240 epochs, global batch 4000 (5x8 GPUs x 100), lr 3e-3, drop path 0; teacher EVA01-CLIP-g/14.
Run:  python tools/train.py configs/eva02/eva02_small_p14_mim_in21k.py
"""

from pathlib import Path

from eva02.engine.config import load_config, override

config = override(load_config(Path(__file__).with_name("eva02_tiny_p14_mim_in21k.py")), {"model.name": "small"})
