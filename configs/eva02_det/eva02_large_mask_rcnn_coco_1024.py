"""EVA-02-L Mask R-CNN on COCO at 1024 px: the official EVA-02 detection recipe mapped onto the engine.

Official (`EVA-02/det/projects/ViTDet/configs/eva2_mim_to_coco/`
`eva2_coco_cascade_mask_rcnn_vitdet_l_4attn_1024_lrd0p8.py`):
backbone `eva02_L_pt_m38m_p14to16` (MIM on Merged-38M, 16 px patches), 1024 px, windows of 16 with global
attention in blocks 5, 11, 17, 23, drop path 0.4; AdamW lr 6e-5, weight decay 0.1, layer decay 0.8; batch 144,
60k iterations (about 74 COCO epochs), 1k warmup iterations, x0.1 steps at 80% and 90%; large-scale jitter
0.1-2.0 and flip; mixed precision; ImageNet mean / std. Reported with Cascade Mask R-CNN heads: 59.2 box AP,
50.8 mask AP on val2017.

What differs here is as in eva02_base_mask_rcnn_coco_1024.py (Mask R-CNN heads, cosine schedule, no weight
decay on norms, torchvision's RoIAlign and losses); gradient checkpointing is on to fit 1024 px batches of
the large model (docs/detection.md has the memory figures).

Train: python tools/train.py configs/eva02_det/eva02_large_mask_rcnn_coco_1024.py  (torchrun --nproc_per_node=8 ...)
Test:  python tools/test.py configs/eva02_det/eva02_large_mask_rcnn_coco_1024.py work_dirs/.../final.safetensors
"""

from pathlib import Path

from eva02.engine.config import load_config, override

STEPS_PER_EPOCH = 814  # 117,266 train2017 images with annotations / batch 144

config = override(
    load_config(Path(__file__).with_name("eva02_base_mask_rcnn_coco_1024.py")),
    {
        "model.name": "eva02-large-p16_m38m-pre_3rdparty_m38m",
        "model.drop_path": 0.4,
        "det.global_blocks": (5, 11, 17, 23),
        "data.batch_size": 2,  # per device; 144 in all through accumulation (8 devices: 9 steps)
        "optim.lr": 6e-5,
        "optim.layer_decay": 0.8,
        "optim.global_batch": 144,
        "schedule.epochs": 74,
        "schedule.warmup_epochs": 1000 / STEPS_PER_EPOCH,
        "train.max_steps": 60000,
        "train.grad_checkpointing": True,
    },
    "eva02_large_mask_rcnn_coco_1024.py",
)
