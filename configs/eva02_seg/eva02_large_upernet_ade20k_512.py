"""EVA-02-L + UperNet on ADE20K at 512 px (official recipe, EVA-02
`seg/configs/eva02/upernet/upernet_eva02_large_24_512_slide_80k.py`; reported mIoU 59.8 single-scale,
60.4 multi-scale + flip).

As the base config (eva02_base_upernet_ade20k_512.py) except: the Merged-38M MIM weights at 16 px
(`eva02_L_pt_m38m_p14to16`), outputs of blocks 7, 11, 15, 23, drop path 0.2, UperNet 1024 wide,
AdamW lr 4e-5 with layer decay 0.9, global batch 16 (official 8 GPUs x 2), 80k iterations.
Multi-scale test: --set seg.test_scales=0.5,0.75,1.0,1.25,1.5,1.75 seg.test_flip=true.

Train:  python tools/train.py configs/eva02_seg/eva02_large_upernet_ade20k_512.py
Test:   python tools/test.py configs/eva02_seg/eva02_large_upernet_ade20k_512.py CHECKPOINT
"""

from pathlib import Path

from eva02.engine.config import load_config, override

ITERS, WARMUP, GLOBAL_BATCH, TRAIN_IMAGES = 80_000, 1_500, 16, 20_210
STEPS_PER_EPOCH = TRAIN_IMAGES // GLOBAL_BATCH  # 1263

config = override(
    load_config(Path(__file__).with_name("eva02_base_upernet_ade20k_512.py")),
    {
        "model.name": "eva02-large-p16_m38m-pre_3rdparty_m38m",
        "model.drop_path": 0.2,
        "data.batch_size": 2,
        "optim.lr": 4e-5,
        "optim.layer_decay": 0.9,
        "optim.global_batch": GLOBAL_BATCH,
        "schedule.epochs": -(-ITERS // STEPS_PER_EPOCH),
        "schedule.warmup_epochs": WARMUP / STEPS_PER_EPOCH,
        "train.max_steps": ITERS,
        "seg.channels": 1024,
        "seg.out_indices": (7, 11, 15, 23),
    },
)
