"""EVA-02-L + a wider UperNet on ADE20K at 640 px (official recipe, EVA-02
`seg/configs/eva02/upernet/upernetpro_eva02_large_24_640_slide_80k.py`; reported mIoU 60.1 single-scale).

As the large 512 config (eva02_large_upernet_ade20k_512.py) except: 640 px crops and test windows
(stride 426), images resized within (2560, 640), UperNet and FCN auxiliary head both 1536 wide.

Train:  python tools/train.py configs/eva02_seg/eva02_large_upernet_ade20k_640.py
Test:   python tools/test.py configs/eva02_seg/eva02_large_upernet_ade20k_640.py CHECKPOINT
"""

from pathlib import Path

from eva02.engine.config import load_config, override

config = override(
    load_config(Path(__file__).with_name("eva02_large_upernet_ade20k_512.py")),
    {
        "model.img_size": 640,
        "seg.scale": (2560, 640),
        "seg.stride": 426,
        "seg.channels": 1536,
        "seg.aux_channels": 1536,
    },
)
