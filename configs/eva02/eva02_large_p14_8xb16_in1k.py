"""EVA-02-L fine-tuning on ImageNet-1k at 448 px from the MIM IN-21K weights (official recipe,
EVA-02 `asuka/README.md`; reported top-1 89.6, EMA weights).

Global batch 1024 = 16 per device x 8 devices x 8 accumulation steps; on other device counts the
accumulation is recomputed from optim.global_batch (it must divide by 16 x devices).
Data: data/imagenet/{train,val} (class folders, or mmpretrain's meta/{train,val}.txt list files).

Train:  python tools/train.py configs/eva02/eva02_large_p14_8xb16_in1k.py
Test:   python tools/test.py configs/eva02/eva02_large_p14_8xb16_in1k.py CHECKPOINT
"""

from eva02.engine.config import DataCfg, EmaCfg, ModelCfg, OptimCfg, RunConfig, ScheduleCfg, TrainCfg

config = RunConfig(
    model=ModelCfg(
        name="eva02-large-p14_in21k-pre_3rdparty_in21k",
        init="pretrained",  # the zoo's MIM weights of `name`; a head of num_classes is added
        num_classes=1000,
        img_size=448,
        drop_path=0.15,
        patch_grad_scale=0.0,  # official stop_grad_conv1: the patch embedding is not trained
    ),
    data=DataCfg(
        root="data/imagenet",
        batch_size=16,
        workers=8,
        rrc_scale=(0.08, 1.0),
        hflip=0.5,
        randaug_n=2,
        randaug_m=9,
        randaug_mstd=0.5,
        reprob=0.0,
        mixup=0.0,
        cutmix=0.0,
        smoothing=0.2,
        crop_pct=1.0,
    ),
    optim=OptimCfg(
        lr=5e-5, layer_decay=0.8, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, clip_grad=0.0, global_batch=1024
    ),
    schedule=ScheduleCfg(epochs=30, warmup_epochs=3, min_lr=0.0),
    ema=EmaCfg(enabled=True, decay=0.9999, evaluate=True),
    train=TrainCfg(amp="bf16", parallel="fsdp", log_every=50),
)
