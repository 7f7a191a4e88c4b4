"""Mask R-CNN R50-FPN (4conv1fc box head), direct pre-training P1x then 1x (LazyConfig twin).

Paper (COCO val box/mask AP): 40.0/35.8, against 38.2/34.7 with ImageNet init and 1x.
"""

from detectron2.model_zoo import get_config

from .common.direct_phases import DIRECT_PRETRAIN, PIXEL_STD

model = get_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

model.roi_heads.box_head.update(conv_dims=[256] * 4, fc_dims=[1024])
model.pixel_std = PIXEL_STD
model.backbone.bottom_up.stages.stride_in_1x1 = False  # as the paper (torchvision-style)
train.output_dir = "output/coco/mask_rcnn_R_50_FPN_direct_P1x_1x_lazy"
