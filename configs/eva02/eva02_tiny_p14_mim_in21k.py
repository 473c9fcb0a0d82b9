"""EVA-02-Ti MIM pre-training on ImageNet-21K (official recipe, EVA-02 `asuka/README.md`, paper table 2).

Student: headless EVA-02-Ti/14 at 224 px (16x16 patches), JAX-style init, patch-embedding gradient x0.1.
Teacher: EVA01-CLIP-g/14 (open_clip 'EVA01-g-14', LAION-400M weights), 1024-d patch features.
240 epochs, global batch 4000 (5 nodes x 8 GPUs x 100), AdamW lr 3e-3, betas (0.9, 0.98), eps 1e-6,
wd 0.05, grad clip 3.0, 1 warmup epoch then cosine to 1e-5, drop path 0, 105 of 256 patches masked.
The official runs used DeepSpeed fp16; bf16 autocast is used here (same speed, no loss scaling).

Run:  python tools/train.py configs/eva02/eva02_tiny_p14_mim_in21k.py   (torchrun for several GPUs)
Data: any folder of images (class folders or not; labels are unused) at data/imagenet21k/train.
"""

from eva02.engine.config import DataCfg, EmaCfg, MimCfg, ModelCfg, OptimCfg, RunConfig, ScheduleCfg, TrainCfg

config = RunConfig(
    model=ModelCfg(name="tiny", num_classes=0, img_size=224, drop_path=0.0, patch_grad_scale=0.1),
    data=DataCfg(
        root="data/imagenet21k",
        train_split="train",
        val_split="",
        batch_size=100,
        workers=10,
        rrc_scale=(0.2, 1.0),
        rrc_ratio=(3 / 4, 4 / 3),
        interpolation="bicubic",
        hflip=0.5,
        randaug_n=0,
        reprob=0.0,
        mixup=0.0,
        cutmix=0.0,
        smoothing=0.0,
    ),
    optim=OptimCfg(
        lr=3e-3, layer_decay=1.0, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6, clip_grad=3.0, global_batch=4000
    ),
    schedule=ScheduleCfg(epochs=240, warmup_epochs=1.0, min_lr=1e-5, warmup_lr=0.0),
    ema=EmaCfg(enabled=False),
    train=TrainCfg(amp="bf16", parallel="ddp", log_every=50, task="mim"),
    mim=MimCfg(
        teacher_kind="open_clip",
        teacher_name="EVA01-g-14",
        teacher_pretrained="laion400m_s11b_b41k",
        num_masking=105,
        min_num=16,
        min_aspect=0.3,
    ),
)
