"""EVA-02-L fine-tuning on ImageNet-1k at 448 px from an IN-21K intermediate fine-tuned checkpoint
(official recipe, `asuka/README.md`: global batch 512, lr 2e-5, layer decay 0.85, 20 epochs, 2 warmup,
drop path 0.15, smoothing 0.2, EMA; reported top-1 89.9 (IN-21K MIM) / 90.0 (Merged-38M MIM)).

model.init must point at the official IN-21K fine-tuned file (its 21841-class head is replaced), e.g.
    --set model.init=data/pretrained/eva02_L_pt_m38m_medft_in21k_p14.pt
Train:  python tools/train.py configs/eva02/eva02_large_p14_medft_8xb16_in1k.py --set model.init=PATH
"""

from pathlib import Path

from eva02.engine.config import load_config, override

config = override(
    load_config(Path(__file__).with_name("eva02_large_p14_8xb16_in1k.py")),
    {
        "model.init": "data/pretrained/eva02_L_pt_m38m_medft_in21k_p14.pt",
        "model.drop_path": 0.15,
        "data.smoothing": 0.2,
        "optim.lr": 2e-5,
        "optim.layer_decay": 0.85,
        "optim.global_batch": 512,
        "schedule.epochs": 20,
        "schedule.warmup_epochs": 2,
    },
)
