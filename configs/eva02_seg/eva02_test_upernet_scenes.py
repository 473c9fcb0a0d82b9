"""A small windowed EVA-02 + UperNet trained from scratch on synthetic scenes (the learning test,
tests/test_seg_learning.py): coloured discs, striped rectangles and dotted triangles (classes 1-3) on
textured backgrounds (class 0), 112-160 px, in the folder layout (images/{train,val}, masks/{train,val}).

Backbone: the 'test' variant widened to 96 and deepened to 4 blocks, 16 px patches, attention in 4 x 4
windows except blocks 1 and 3 (global); UperNet 64 wide, FCN auxiliary head 32 wide. Everything else
takes the official recipe's shape: the random rescale (here of (512, 128)), cat_max_ratio crop, flip,
photometric distortion, sliding-window test (128 windows, stride 96).

Train:  python tools/train.py configs/eva02_seg/eva02_test_upernet_scenes.py --set data.root=DIR
"""

from eva02.data.segmentation import IMAGENET_MEAN, IMAGENET_STD
from eva02.engine.config import CheckpointCfg, DataCfg, ModelCfg, OptimCfg, RunConfig, ScheduleCfg, SegCfg, TrainCfg

config = RunConfig(
    model=ModelCfg(
        name="test",
        num_classes=4,
        img_size=128,
        patch_size=16,
        dim=96,
        depth=4,
        heads=2,
        mlp_hidden=256,
        drop_path=0.0,
        patch_grad_scale=1.0,
    ),  # fmt: skip
    data=DataCfg(
        root="data/scenes",
        train_split="train",
        val_split="val",
        batch_size=8,
        workers=0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hflip=0.5,
    ),
    optim=OptimCfg(lr=2e-3, layer_decay=1.0, weight_decay=0.05, global_batch=8),
    schedule=ScheduleCfg(epochs=6, warmup_epochs=0.5),
    checkpoint=CheckpointCfg(every_epochs=3, keep_last=1),
    train=TrainCfg(task="segment", log_every=10, eval_every_epochs=3),
    seg=SegCfg(
        layout="folders",
        reduce_zero_label=False,
        scale=(512, 128),
        ratio_range=(0.75, 1.5),
        stride=96,
        channels=64,
        aux_channels=32,
        window_size=4,
        global_blocks=(1, 3),
        cls_token=False,
    ),
)
