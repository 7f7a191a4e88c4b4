"""LazyConfig twin of faster_rcnn_R_18_FPN_direct.yaml: the same model, data and phases.

Run it like the yacs file, with a.b=c overrides:
    python train_net.py --config-file configs/trees/faster_rcnn_R_18_FPN_direct.py \
        DIRECT_PRETRAIN.PRETRAIN.EPOCHS=12
"""

from detectron2.model_zoo import get_config

from direct_pretrain.config import default_direct_pretrain

model = get_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

# Faster R-CNN R-18-FPN with one class ("tree"): no mask branch, basic blocks.
model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1  # basic blocks have no 1x1 convolutions
model.roi_heads.num_classes = 1
model.roi_heads.box_predictor.test_topk_per_image = 200
# Crowns are 8-110 px at native resolution, half that in pre-training.
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]

dataloader.train.dataset.names = "neon_trees_train"
dataloader.train.mapper.use_instance_mask = False
dataloader.train.num_workers = 2
dataloader.test.dataset.names = "neon_trees_val"
dataloader.test.num_workers = 2

train.output_dir = "output/demo_lazy"
train.seed = 0

DIRECT_PRETRAIN = default_direct_pretrain()
DIRECT_PRETRAIN["PIXEL_STATS"] = "dataset"
DIRECT_PRETRAIN["PRETRAIN"].update(
    SCALE=[128, 128], CROP_SIZE=[128, 128], MIN_SIZE_TEST=128, MAX_SIZE_TEST=128,
    BACKBONE_NORM="BN", IMS_PER_BATCH=8, BASE_LR=0.02, EPOCHS=24.0, DATASET_REPEAT=1,
    WARMUP_ITERS=50, ROI_BATCH_SIZE_PER_IMAGE=128, CHECKPOINT_PERIOD=100, EVAL_PERIOD=80,
)
DIRECT_PRETRAIN["FINETUNE"].update(
    MIN_SIZE_TRAIN=[256], MAX_SIZE_TRAIN=256, MIN_SIZE_TEST=256, MAX_SIZE_TEST=256,
    BACKBONE_NORM="FrozenBN", IMS_PER_BATCH=4, BASE_LR=0.01, EPOCHS=4.0, STEP_EPOCHS=[3.0],
    WARMUP_ITERS=20, ROI_BATCH_SIZE_PER_IMAGE=256, CHECKPOINT_PERIOD=50, EVAL_PERIOD=27,
)
