"""FCOS R50-FPN (GN head), direct pre-training P1x then 1x (LazyConfig twin of the .yaml)."""

from detectron2.model_zoo import get_config

from .common.direct_phases import DIRECT_PRETRAIN, PIXEL_STD

model = get_config("common/models/fcos.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

model.pixel_std = PIXEL_STD
model.backbone.bottom_up.stages.stride_in_1x1 = False  # as the paper (torchvision-style)
dataloader.train.mapper.use_instance_mask = False
train.output_dir = "output/coco/fcos_R_50_FPN_direct_P1x_1x_lazy"
DIRECT_PRETRAIN["PRETRAIN"].update(BASE_LR=0.04, WARMUP_ITERS=1000, HEAD_NORM="GN")
DIRECT_PRETRAIN["FINETUNE"].update(BASE_LR=0.01, HEAD_NORM="GN")
