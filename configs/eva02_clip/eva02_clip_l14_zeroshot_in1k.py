"""EVA02-CLIP-L/14 zero-shot classification on ImageNet-1k (reported top-1 79.8): the 1000 CLIP class
names and the 80 prompt templates, 224 px, bicubic resize of the short side and center crop.

Data: data/imagenet/val (class folders in the standard order, or mmpretrain's meta/val.txt).
Test:  python tools/test.py configs/eva02_clip/eva02_clip_l14_zeroshot_in1k.py CHECKPOINT
       (CHECKPOINT: open_clip's open_clip_pytorch_model.bin, BAAI's EVA02_CLIP_L_psz14_s4B.pt or ours)
Other datasets: --set data.root=DIR clip.class_names='' (folder names) or clip.class_names=names.txt
"""

from eva02.engine.config import ClipCfg, DataCfg, ModelCfg, RunConfig, TrainCfg

config = RunConfig(
    model=ModelCfg(name="EVA02-CLIP-L-14", num_classes=1000, img_size=224),
    data=DataCfg(root="data/imagenet", val_split="val", batch_size=64, workers=8, crop_pct=1.0),
    clip=ClipCfg(class_names="imagenet", templates="imagenet"),
    train=TrainCfg(task="zero_shot", amp="bf16"),
)
