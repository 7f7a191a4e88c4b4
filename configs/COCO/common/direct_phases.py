"""The paper's two COCO phases for LazyConfig files (twin of Base-Direct-Phases.yaml).

The node's defaults are the paper's COCO recipe (pre-train: 448 scale jitter + crop, BN, batch
64, LR 0.08 fixed after a 500-iteration warmup, 12 epochs x 4 repeats; fine-tune: 1333x800,
FrozenBN, batch 16, LR 0.02, 1x); the public fine-tuning configs also freeze stem + res2.
"""

from direct_pretrain.config import default_direct_pretrain

DIRECT_PRETRAIN = default_direct_pretrain()
DIRECT_PRETRAIN["FINETUNE"].update(FREEZE_AT=2, WARMUP_ITERS=500)

# ImageNet statistics in BGR order; no ImageNet weights are used.
PIXEL_STD = [57.375, 57.120, 58.395]
