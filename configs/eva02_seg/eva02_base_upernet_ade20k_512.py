"""EVA-02-B + UperNet semantic segmentation on ADE20K at 512 px (official recipe, EVA-02
`seg/configs/eva02/upernet/upernet_eva02_base_12_512_slide_60k.py`; reported mIoU 55.3 single-scale).

Backbone: the MIM IN-21K weights with the patch kernel at 16 px (`eva02_B_pt_in21k_p14to16`), the
official seg layout (class token kept, global attention), outputs of blocks 3, 5, 7, 11, drop path
0.15; UperNet 768 wide, FCN auxiliary head 256 wide (loss weight 0.4). Data: ADEChallengeData2016 under
data/ade/ (images/{training,validation}/*.jpg, annotations/.../*.png), ImageNet mean / std.
AdamW lr 6e-5, layer decay 0.85, wd 0.05, global batch 32 (official 4 GPUs x 8), 60k iterations with
a 1500-iteration linear warmup, then a linear decay to 0 (poly, power 1) as the official run. Test: sliding 512 windows,
stride 341, images resized within (2048, 512); multi-scale + flip with
--set seg.test_scales=0.5,0.75,1.0,1.25,1.5,1.75 seg.test_flip=true.

Train:  python tools/train.py configs/eva02_seg/eva02_base_upernet_ade20k_512.py
Test:   python tools/test.py configs/eva02_seg/eva02_base_upernet_ade20k_512.py CHECKPOINT
"""

from eva02.data.segmentation import IMAGENET_MEAN, IMAGENET_STD
from eva02.engine.config import CheckpointCfg, DataCfg, ModelCfg, OptimCfg, RunConfig, ScheduleCfg, SegCfg, TrainCfg

ITERS, WARMUP, GLOBAL_BATCH, TRAIN_IMAGES = 60_000, 1_500, 32, 20_210
STEPS_PER_EPOCH = TRAIN_IMAGES // GLOBAL_BATCH  # the engine counts epochs: 631 steps each

config = RunConfig(
    model=ModelCfg(
        name="eva02-base-p16_in21k-pre_3rdparty_in21k",
        init="pretrained",  # the zoo's MIM weights; the 224 px position embedding is resampled to 512
        num_classes=150,
        img_size=512,  # the training crop and the test window
        patch_size=16,
        drop_path=0.15,
        patch_grad_scale=1.0,  # the seg backbone trains its patch embedding
    ),
    data=DataCfg(
        root="data/ade/ADEChallengeData2016",
        train_split="training",
        val_split="validation",
        batch_size=8,
        eval_batch_size=1,
        workers=4,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hflip=0.5,
    ),
    optim=OptimCfg(lr=6e-5, layer_decay=0.85, weight_decay=0.05, betas=(0.9, 0.999), global_batch=GLOBAL_BATCH),
    schedule=ScheduleCfg(
        epochs=-(-ITERS // STEPS_PER_EPOCH), warmup_epochs=WARMUP / STEPS_PER_EPOCH, min_lr=0.0, kind="poly", power=1.0
    ),
    checkpoint=CheckpointCfg(every_epochs=2, keep_last=2),
    # sync_bn: the heads' BatchNorm as the official SyncBN under DDP on GPUs (per process on CPU)
    train=TrainCfg(task="segment", amp="bf16", max_steps=ITERS, eval_every_epochs=2, log_every=50, sync_bn=True),
    seg=SegCfg(
        layout="ade20k",
        reduce_zero_label=True,
        scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        stride=341,
        channels=768,
        aux_channels=256,
        aux_weight=0.4,
        out_indices=(3, 5, 7, 11),
    ),
)
