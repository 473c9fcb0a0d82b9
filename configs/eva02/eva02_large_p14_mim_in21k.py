"""EVA-02-L MIM pre-training on ImageNet-21K (official recipe, EVA-02 `asuka/README.md`).

150 epochs, global batch 2048 (8 nodes x 8 GPUs x 32), lr 1.5e-3, drop path 0.1, ZeRO-1 upstream (FSDP2
here), otherwise as the tiny config; teacher EVA01-CLIP-g/14. The Merged-38M run is the same recipe for
56 epochs on the merged data set (`--cfg-options schedule.epochs=56 data.root=...`).
Run:  torchrun --nproc_per_node 8 tools/train.py configs/eva02/eva02_large_p14_mim_in21k.py
"""

from pathlib import Path

from eva02.engine.config import load_config, override

config = override(
    load_config(Path(__file__).with_name("eva02_tiny_p14_mim_in21k.py")),
    {
        "model.name": "large",
        "model.drop_path": 0.1,
        "data.batch_size": 32,
        "optim.lr": 1.5e-3,
        "optim.global_batch": 2048,
        "schedule.epochs": 150,
        "train.parallel": "fsdp",
    },
)
