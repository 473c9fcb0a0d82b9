"""EVA-02-B Mask R-CNN on COCO at 1024 px: the official EVA-02 detection recipe mapped onto the engine.

Official (`EVA-02/det/projects/ViTDet/configs/eva2_mim_to_coco/`
`eva2_coco_cascade_mask_rcnn_vitdet_b_4attn_1024_lrd0p7.py`
on ViTDet's `mask_rcnn_vitdet_b_100ep` and `coco_loader_lsj_1024`): backbone `eva02_B_pt_in21k_p14to16` (MIM on
IN-21K, 16 px patches), 1024 px input, windows of 16 with global attention in blocks 2, 5, 8, 11, drop path 0.1;
AdamW lr 5e-5, weight decay 0.1, betas (0.9, 0.999), layer decay 0.7; batch 128, 60k iterations (about 65
COCO epochs) with 1k warmup iterations and x0.1 steps at 80% and 90%; large-scale jitter 0.1-2.0 and flip;
mixed precision; ImageNet mean / std (detectron2's imagenet_rgb256 constants). Reported with Cascade Mask
R-CNN heads: 55.5 box AP, 47.1 mask AP on val2017.

What differs here:
- heads: Mask R-CNN from torchvision, which has no Cascade R-CNN (docs/detection.md); expect lower AP;
- schedule: the engine's per-step cosine to 0 after a linear warmup (1000 steps = 1.09 epochs of 916
  steps at batch 128), not the step decay;
- weight decay: the engine exempts 1-D parameters (norms, biases) and pos_embed, the official run decays
  norms as well (`weight_decay_norm=None`);
- torchvision's RoIAlign (no half-pixel offset) and smooth-L1 box losses.

Data: COCO 2017 under data/coco: train2017/, val2017/, annotations/instances_{train,val}2017.json.
Train: python tools/train.py configs/eva02_det/eva02_base_mask_rcnn_coco_1024.py  (torchrun --nproc_per_node=8 ...)
Test:  python tools/test.py configs/eva02_det/eva02_base_mask_rcnn_coco_1024.py work_dirs/.../final.safetensors
Draw:  eva02 detect IMAGES --config configs/eva02_det/eva02_base_mask_rcnn_coco_1024.py --checkpoint FILE -o out/
"""

from eva02.engine.config import RunConfig, override
from eva02.model.detect import IMAGENET_MEAN, IMAGENET_STD

STEPS_PER_EPOCH = 916  # 117,266 train2017 images with annotations / batch 128

config = override(
    RunConfig(),
    {
        "train.task": "detect",
        "model.name": "eva02-base-p16_in21k-pre_3rdparty_in21k",
        "model.init": "pretrained",
        "model.img_size": 1024,
        "model.patch_size": 16,
        "model.num_classes": 80,
        "model.drop_path": 0.1,
        "model.patch_grad_scale": 1.0,  # the patch embedding trains (ViTDet)
        "det.window_size": 16,
        "det.global_blocks": (2, 5, 8, 11),
        "det.lsj_scale": (0.1, 2.0),
        "data.root": "data/coco",
        "data.train_split": "train2017",
        "data.val_split": "val2017",
        "data.batch_size": 2,  # per device; 128 in all through accumulation (8 devices: 8 steps)
        "data.eval_batch_size": 1,
        "data.hflip": 0.5,
        "data.mean": IMAGENET_MEAN,
        "data.std": IMAGENET_STD,
        "optim.lr": 5e-5,
        "optim.weight_decay": 0.1,
        "optim.betas": (0.9, 0.999),
        "optim.layer_decay": 0.7,
        "optim.global_batch": 128,
        "optim.clip_grad": 0.0,
        "schedule.epochs": 66,
        "schedule.warmup_epochs": 1000 / STEPS_PER_EPOCH,
        "schedule.min_lr": 0.0,
        "train.max_steps": 60000,
        "train.amp": "bf16",
        "train.eval_every_epochs": 11,
        "checkpoint.every_epochs": 1,
        "ema.enabled": False,
    },
    "eva02_base_mask_rcnn_coco_1024.py",
)
