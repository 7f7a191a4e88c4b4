"""Cascade R-CNN R50-FPN, direct pre-training P1x then 1x (LazyConfig twin).

Paper (COCO val box AP): 41.5, against 40.3 with ImageNet initialisation and 1x.
"""

from detectron2.model_zoo import get_config

from .common.direct_phases import DIRECT_PRETRAIN, PIXEL_STD

model = get_config("common/models/cascade_rcnn.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
model.proposal_generator.post_nms_topk = (2000, 1000)
model.pixel_std = PIXEL_STD
model.backbone.bottom_up.stages.stride_in_1x1 = False  # as the paper (torchvision-style)
dataloader.train.mapper.use_instance_mask = False
train.output_dir = "output/coco/cascade_rcnn_R_50_FPN_direct_P1x_1x_lazy"
