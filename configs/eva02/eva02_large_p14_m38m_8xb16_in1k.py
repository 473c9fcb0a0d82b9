"""EVA-02-L fine-tuning on ImageNet-1k at 448 px from the MIM Merged-38M weights (official recipe:
as the IN-21K run but lr 7e-5; reported top-1 89.6 with EMA weights).

Train:  python tools/train.py configs/eva02/eva02_large_p14_m38m_8xb16_in1k.py
"""

from pathlib import Path

from eva02.engine.config import load_config, override

config = override(
    load_config(Path(__file__).with_name("eva02_large_p14_8xb16_in1k.py")),
    {"model.name": "eva02-large-p14_m38m-pre_3rdparty_m38m", "optim.lr": 7e-5},
)
