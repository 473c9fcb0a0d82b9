"""EVA-02-B/16 MIM pre-trained backbone (headless, 224 px): `eva02-base-p16_in21k-pre_3rdparty_in21k`.

For feature extraction (num_classes 0: pooled features / tokens), and as a fine-tuning init: the
schedule is the official in1k recipe of this size; set a head to train, e.g.
    python tools/train.py configs/eva02/eva02_base_p16_headless.py --set model.num_classes=1000 model.img_size=448
"""

from pathlib import Path

from eva02.engine.config import load_config, override

config = override(
    load_config(Path(__file__).with_name("eva02_base_p14_8xb16_in1k.py")),
    {
        "model.name": "eva02-base-p16_in21k-pre_3rdparty_in21k",
        "model.init": "pretrained",
        "model.num_classes": 0,
        "model.img_size": 224,
    },
)
