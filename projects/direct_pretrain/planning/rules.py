"""The planner's rules: each turns the data's figures into one or a few config values, with the
reason and the figure behind it. Pure functions of the data, the device and the model's anchor
layout; no config is read or written here (:mod:`.plan` does that).

Every size rule works on the *median* image (sizes of the images vary little in most
detection datasets; the fingerprint says how much) and on the box side ``sqrt(w * h)``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..data.fingerprint import box_sizes

__all__ = [
    "ADAPT_ITERATIONS",
    "Choice",
    "DataFigures",
    "FT_SMALL_BOX",
    "NATIVE_MIN_BOX",
    "PT_FLOOR",
    "PT_MIN_RATIO",
    "LOW_ANCHOR_RECALL",
    "MIN_ITERATIONS",
    "anchor_recall",
    "anchor_warning",
    "budget_crop",
    "batch_and_lr",
    "choose_anchor_sizes",
    "cpu_batch",
    "CPU_BATCH_CAP",
    "PROBE_SHARE",
    "feature_strides",
    "finetune_candidates",
    "finetune_scale",
    "finetune_sizes",
    "pick_measured_scale",
    "pretrain_scale",
    "per_level",
    "pretrain_sizes",
    "roi_batch",
    "schedule_split",
    "phase_schedule",
]

# The fine-tune scale brings the 10th-percentile box to this side (px) ...
FT_SMALL_BOX = 24.0
# ... never above the native resolution, unless that box is smaller than this at native
# resolution (then up to 2x, to reach this size).
NATIVE_MIN_BOX = 16.0
MAX_UPSCALE = 2.0
# Pre-training shrinks the fine-tune scale by up to PT_MIN_RATIO (the paper pre-trains at about
# a third of its fine-tune side), keeping the 10th-percentile box at PT_FLOOR px at least.
PT_MIN_RATIO = 1 / 3
PT_FLOOR = 10.0
# Training inputs larger than this (long side, px) are cut into random crops of this size
# (evaluation stays on whole images). Per device: a CPU trains small inputs.
CROP_LIMIT = {
    "cpu": {"FINETUNE": 512, "PRETRAIN": 320},
    "cuda": {"FINETUNE": 1024, "PRETRAIN": 512},
}
# A box counts as matched by an anchor at this IoU (shape only, anchor centred on the box).
MATCH_IOU = 0.5
# Each level's anchors are at least this many times its stride: anchors sit every stride px, so
# a box half a stride off the nearest one still overlaps it at IoU >= 0.5 (0.53 at 3x).
ANCHOR_STRIDES = 3
# Anchors matching fewer than this share of the boxes at a phase's scale are warned about.
LOW_ANCHOR_RECALL = 0.5
# Anchor aspect ratios (h/w) assumed when the config gives none.
DEFAULT_RATIOS = (0.5, 1.0, 2.0)
# RoIs sampled per image: this many per object in the training input, within the bounds.
ROIS_PER_OBJECT = 8
ROI_BOUNDS = (64, 512)
# Images per iteration on CPU (per phase) and the cap on GPU; the LR scaling rule's anchors.
CPU_BATCH = {"PRETRAIN": 8, "FINETUNE": 4}
GPU_BATCH_CAP = {"PRETRAIN": 64, "FINETUNE": 16}
# On CPU the batch doubles from CPU_BATCH while the measured images per second grow by more than
# CPU_BATCH_GAIN (less is within this machine's drift: the demo's phases measured flat within 6%
# from 4 images on, BENCHMARKS section 1), up to CPU_BATCH_CAP. A doubling is not timed when its
# steps would take more than PROBE_SHARE of the budget.
CPU_BATCH_GAIN = 1.1
CPU_BATCH_CAP = {"PRETRAIN": 32, "FINETUNE": 16}
PROBE_SHARE = 0.05
# Epochs a phase should get at least: when the budget cannot pay them at the planned input,
# the phase trains on smaller random crops at the same scale (not below MIN_CROP px).
MIN_EPOCHS = {"PRETRAIN": 12.0, "FINETUNE": 3.0}
MIN_CROP = 128
# A phase runs at least this many iterations, whatever its share of the budget.
MIN_ITERATIONS = 10
# Warmup iterations at least, also in a shorter phase (the demo's pre-training: 13 diverged
# from scratch at LR 0.02, in the plan study and on a new 3-class dataset).
MIN_WARMUP = 50
# Share of the training budget that goes to fine-tuning, and when the scale changes by more
# than LARGE_SCALE_CHANGE between the phases.
FT_SHARE = 1 / 3
FT_SHARE_LARGE_CHANGE = 1 / 2
LARGE_SCALE_CHANGE = 2.5
# Where the pre-train and fine-tune scales differ by more than MEASURE_MIN_CHANGE, the fine-tune
# scale is measured: the pre-trained model is evaluated on the validation slice at
# MEASURED_SCALES scales from the pre-train scale to the rule's fine-tune scale (geometric), and
# the largest whose box AP is within MEASURE_TOLERANCE of the best is kept (the slice is small:
# a larger scale within its noise is preferred, it sees the small objects better).
MEASURE_MIN_CHANGE = 1.25
MEASURED_SCALES = 3
MEASURE_TOLERANCE = 0.9
# The rule is unsure only for a short fine-tune: with at least ADAPT_ITERATIONS at the rule's
# scale the model adapts to the change of scale and the rule's scale stands, unmeasured (plan
# study: 130 fine-tune iterations at 2.1x the pre-train scale gained 3.4 AP, 30 lost 3.7; the
# pre-trained model evaluated at a larger scale scores low in both, so that measurement cannot
# tell the two apart).
ADAPT_ITERATIONS = 100


@dataclasses.dataclass(frozen=True)
class Choice:
    """One planned (or kept) config value and why."""

    key: str
    value: object
    rule: str
    figure: str = ""
    yours: bool = False
    warning: str = ""
    kept: bool = False  # the config's value, kept with a key of yours of the same group

    def row(self) -> dict:
        return {
            "key": self.key,
            "value": self.value,
            "by": "yours" if self.yours else "kept" if self.kept else "plan",
            "rule": self.rule,
            "figure": self.figure,
            **({"warning": self.warning} if self.warning else {}),
        }


@dataclasses.dataclass(frozen=True)
class DataFigures:
    """The figures the rules read: image sizes and box sizes of the training set."""

    heights: np.ndarray  # per image
    widths: np.ndarray
    box_wh: np.ndarray  # (N, 2), pixels
    box_image: np.ndarray  # image index of each box

    @classmethod
    def of(cls, dicts: list[dict]) -> "DataFigures":
        sizes, images = box_sizes(dicts)
        return cls(
            heights=np.asarray([d["height"] for d in dicts], dtype=float),
            widths=np.asarray([d["width"] for d in dicts], dtype=float),
            box_wh=sizes,
            box_image=images,
        )

    @property
    def sides(self) -> np.ndarray:
        return np.sqrt(self.box_wh[:, 0] * self.box_wh[:, 1])

    def side(self, percentile: float) -> float:
        """A percentile of the box side (px); 0 without boxes."""
        return float(np.percentile(self.sides, percentile)) if len(self.sides) else 0.0

    @property
    def image_size(self) -> tuple[float, float]:
        """Median (height, width)."""
        return float(np.median(self.heights)), float(np.median(self.widths))

    @property
    def boxes_per_image(self) -> float:
        return len(self.sides) / max(1, len(self.heights))


def _round32(value: float, low: int = 64) -> int:
    return max(low, int(round(value / 32.0)) * 32)


def finetune_scale(data: DataFigures) -> Choice:
    """The fine-tune scale: the 10th-percentile box at ``FT_SMALL_BOX`` px, at most native
    resolution unless that box is under ``NATIVE_MIN_BOX`` px there (then up to 2x)."""
    p10 = data.side(10)
    if p10 <= 0:
        return Choice("scale", 1.0, "no boxes: native resolution")
    if p10 < NATIVE_MIN_BOX:
        scale = min(MAX_UPSCALE, NATIVE_MIN_BOX / p10)
        rule = f"small objects: enlarge so the 10th-percentile box reaches {NATIVE_MIN_BOX:g} px"
    else:
        scale = min(1.0, FT_SMALL_BOX / p10)
        rule = f"10th-percentile box at {FT_SMALL_BOX:g} px, never above native resolution"
    return Choice("scale", scale, rule, f"10th-percentile box {p10:.0f} px at native size")


def pretrain_scale(data: DataFigures, ft_scale: float) -> Choice:
    """The pre-train scale: the fine-tune scale shrunk by up to ``PT_MIN_RATIO``, keeping the
    10th-percentile box at ``PT_FLOOR`` px."""
    p10 = data.side(10) * ft_scale
    ratio = min(1.0, max(PT_MIN_RATIO, PT_FLOOR / p10)) if p10 > 0 else PT_MIN_RATIO
    floor = (data.sides * ft_scale * ratio < PT_FLOOR / 2).mean() if len(data.sides) else 0.0
    return Choice(
        "scale",
        ft_scale * ratio,
        f"fine-tune scale x{ratio:.2f}: at most 1/3 (the paper's ratio), 10th-percentile box "
        f">= {PT_FLOOR:g} px",
        f"10th-percentile box {p10 * ratio:.1f} px; {100 * floor:.0f}% of boxes under "
        f"{PT_FLOOR / 2:g} px",
    )


def _scaled(data: DataFigures, scale: float) -> tuple[int, int, int, int]:
    """(height, width, short, long) of the median image at ``scale``, rounded to 32 px."""
    height, width = data.image_size
    return (
        _round32(height * scale),
        _round32(width * scale),
        _round32(min(height, width) * scale),
        _round32(max(height, width) * scale),
    )


def _test_sizes(data: DataFigures, scale: float, figure: str) -> list[Choice]:
    _, _, short, long = _scaled(data, scale)
    rule = "whole images at the phase's scale"
    return [Choice("MIN_SIZE_TEST", short, rule, figure), Choice("MAX_SIZE_TEST", long, rule)]


def finetune_sizes(data: DataFigures, scale: float, device: str) -> list[Choice]:
    """Fine-tune resize: whole images at ``scale`` (shortest edge), or random crops at that
    scale when the scaled images exceed the device's crop limit."""
    height, width, short, long = _scaled(data, scale)
    limit = CROP_LIMIT[_device(device)]["FINETUNE"]
    figure = f"10th-percentile box {data.side(10) * scale:.0f} px"
    if long <= limit:
        rule = f"whole images at scale {scale:.2f} (long side <= {limit} px on {device})"
        choices = [
            Choice("AUGMENTATION", "shortest_edge", rule),
            Choice("MIN_SIZE_TRAIN", (short,), rule, figure),
            Choice("MAX_SIZE_TRAIN", long, rule),
        ]
    else:
        rule = f"random {limit}-px crops at scale {scale:.2f} (images of {long} px > {limit})"
        crop = (min(height, limit), min(width, limit))
        choices = [
            Choice("AUGMENTATION", "fixed_size_crop", rule),
            Choice("SCALE", (height, width), rule, figure),
            Choice("CROP_SIZE", crop, rule),
        ]
    return choices + _test_sizes(data, scale, figure)


def pretrain_sizes(data: DataFigures, scale: float, device: str) -> list[Choice]:
    """Pre-train resize: scale jitter and random crops (the paper's), the crop capped by the
    device's limit."""
    height, width, _, _ = _scaled(data, scale)
    limit = CROP_LIMIT[_device(device)]["PRETRAIN"]
    figure = f"10th-percentile box {data.side(10) * scale:.1f} px"
    rule = f"image at scale {scale:.2f}, random crop of at most {limit} px"
    return [
        Choice("AUGMENTATION", "fixed_size_crop", rule),
        Choice("SCALE", (height, width), rule, figure),
        Choice("CROP_SIZE", (min(height, limit), min(width, limit)), rule),
    ] + _test_sizes(data, scale, figure)


def budget_crop(
    data: DataFigures, phase: str, scale: float, side: int, epochs: float
) -> list[Choice] | None:
    """Random crops at ``scale`` small enough (by the square root of the shortfall) for the
    phase to get about ``MIN_EPOCHS`` where its input of ``side`` px would get ``epochs``;
    None if it gets them or the crop cannot shrink."""
    need = MIN_EPOCHS[phase]
    if epochs >= need:
        return None
    crop = max(MIN_CROP, int(side * math.sqrt(epochs / need)) // 32 * 32)
    if crop >= side:
        return None
    height, width, _, _ = _scaled(data, scale)
    rule = (
        f"budget: {crop}-px random crops at scale {scale:.2f} for about {need:g} epochs "
        "(objects keep their size)"
    )
    figure = f"{epochs:.1f} epochs at {side} px"
    return [
        Choice("AUGMENTATION", "fixed_size_crop", rule),
        Choice("SCALE", (height, width), rule, figure),
        Choice("CROP_SIZE", (min(height, crop), min(width, crop)), rule, figure),
    ]


def _device(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def per_level(values) -> list[list[float]]:
    """Detectron2's anchor sizes or ratios: one list per level, or one list for all levels."""
    values = list(values)
    return [list(v) for v in values] if values and hasattr(values[0], "__len__") else [values]


def _anchor_shapes(sizes, ratios) -> np.ndarray:
    """(width, height) of every anchor of every level."""
    sizes, ratios = per_level(sizes), per_level(ratios) if len(ratios) else []
    shapes = []
    for level, level_sizes in enumerate(sizes):
        level_ratios = ratios[min(level, len(ratios) - 1)] if ratios else DEFAULT_RATIOS
        for size in level_sizes:
            for ratio in level_ratios:  # Detectron2: ratio = height / width, area = size^2
                width = size / math.sqrt(ratio)
                shapes.append((width, width * ratio))
    return np.asarray(shapes, dtype=float).reshape(-1, 2)


def anchor_recall(box_wh: np.ndarray, sizes, ratios=()) -> float:
    """Share of boxes that some anchor matches at IoU >= ``MATCH_IOU`` when centred on the box
    (shape only: an upper bound of the RPN's recall, like YOLOv5's best possible recall)."""
    if not len(box_wh):
        return 1.0
    anchors = _anchor_shapes(sizes, ratios)
    inter = np.minimum(box_wh[:, None, 0], anchors[None, :, 0]) * np.minimum(
        box_wh[:, None, 1], anchors[None, :, 1]
    )
    union = (box_wh[:, 0] * box_wh[:, 1])[:, None] + (anchors[:, 0] * anchors[:, 1])[None] - inter
    iou = inter / np.maximum(union, 1e-9)
    return float((iou.max(axis=1) >= MATCH_IOU).mean())


def feature_strides(features: list[str]) -> list[int | None]:
    """Each feature map's stride from its Detectron2 FPN name ("p3" -> 8); None for others."""
    return [2 ** int(f[1:]) if f[:1] == "p" and f[1:].isdigit() else None for f in features]


def anchor_warning(key: str, sizes, recall: dict[str, float]) -> str:
    """The warning for anchors that match fewer than ``LOW_ANCHOR_RECALL`` of the boxes at a
    phase's scale ("" if they match enough at every phase)."""
    low = {n: r for n, r in recall.items() if r < LOW_ANCHOR_RECALL}
    if not low:
        return ""
    return (
        f"{key} = {sizes} matches only {recall_text(low)} (IoU >= {MATCH_IOU:g}, anchor centred "
        "on the box): the detector will miss the others. Use anchors nearer the box sizes (see "
        "report/box_sizes.png), or leave the key to the plan (DIRECT_PRETRAIN.BUDGET_MINUTES)"
    )


def choose_anchor_sizes(
    key: str, data: DataFigures, scales: dict[str, float], sizes, ratios, strides: list[int]
) -> Choice:
    """The config's anchor sizes (config key ``key``) scaled by a power of two (its layout kept)
    that match the most boxes at the worst of the phases' scales, each level's anchors at least
    ``ANCHOR_STRIDES`` times its stride."""
    best = None
    for k in range(-3, 4):
        candidate = [[float(s) * 2.0**k for s in level] for level in sizes]
        if any(min(level) < ANCHOR_STRIDES * stride for level, stride in zip(candidate, strides)):
            continue
        recall = {n: anchor_recall(data.box_wh * s, candidate, ratios) for n, s in scales.items()}
        score = (min(recall.values()), -abs(k))
        if best is None or score > best[0]:
            best = (score, candidate, recall)
    if best is None:
        return Choice(
            key, sizes, f"kept: no scaling keeps each anchor >= {ANCHOR_STRIDES}x its stride"
        )
    _, candidate, recall = best
    value = [[_tidy(s) for s in level] for level in candidate]
    return Choice(
        key,
        value,
        f"the config's anchors scaled by a power of 2 to match the most boxes (IoU >= "
        f"{MATCH_IOU:g}), each >= {ANCHOR_STRIDES}x its level's stride {strides}",
        recall_text(recall),
    )


def recall_text(recall: dict[str, float]) -> str:
    return ", ".join(f"{100 * r:.0f}% of boxes matched at {n} scale" for n, r in recall.items())


def _tidy(value: float):
    return int(value) if float(value).is_integer() else round(value, 2)


def roi_batch(data: DataFigures, scale: float, crop: tuple[int, int] | None) -> Choice:
    """RoIs per image: ``ROIS_PER_OBJECT`` per object in a training input, within bounds."""
    objects = data.boxes_per_image
    if crop is not None:
        height, width = data.image_size
        objects *= min(1.0, crop[0] * crop[1] / (height * width * scale * scale))
    value = int(
        np.clip(2 ** math.ceil(math.log2(max(1.0, ROIS_PER_OBJECT * objects))), *ROI_BOUNDS)
    )
    return Choice(
        "ROI_BATCH_SIZE_PER_IMAGE",
        value,
        f"{ROIS_PER_OBJECT} RoIs per object in a training input (power of 2 in {ROI_BOUNDS})",
        f"{objects:.1f} objects per training input",
    )


def cpu_batch(timed: dict[int, float]) -> Choice:
    """The batch of ``timed`` (``{batch: seconds per iteration}``, doubling from ``CPU_BATCH``)
    where doubling stops paying: each doubling is kept while its images per second beat the
    batch before by more than ``CPU_BATCH_GAIN``."""
    rates = {b: b / max(s, 1e-9) for b, s in sorted(timed.items())}
    chosen = min(rates)
    for batch in sorted(rates)[1:]:
        if rates[batch] <= CPU_BATCH_GAIN * rates[chosen]:
            break
        chosen = batch
    return Choice(
        "IMS_PER_BATCH",
        chosen,
        f"CPU: doubled while images/s grow by more than {CPU_BATCH_GAIN - 1:.0%}",
        "images/s " + ", ".join(f"{b}: {r:.2f}" for b, r in rates.items()),
    )


def batch_and_lr(batch: Choice) -> list[Choice]:
    """The batch choice and the LR scaled with it: 0.0025 per image up to 8 images, Detectron2's
    0.02 per 16 images (linear scaling) beyond."""
    lr = max(0.0025 * min(batch.value, 8), 0.00125 * batch.value)
    return [
        batch,
        Choice(
            "BASE_LR",
            round(lr, 5),
            "0.0025 x batch up to 8, then 0.02 x batch / 16",
            f"batch {batch.value}",
        ),
    ]


def finetune_candidates(pretrain: float, finetune: float) -> list[float]:
    """The fine-tune scales to measure, from the pre-train scale to the rule's fine-tune scale
    (geometric); the rule's scale alone when they are close."""
    if finetune < pretrain * MEASURE_MIN_CHANGE:
        return [finetune]
    step = (finetune / pretrain) ** (1 / (MEASURED_SCALES - 1))
    return [round(pretrain * step**i, 4) for i in range(MEASURED_SCALES - 1)] + [finetune]


def pick_measured_scale(scales: list[float], box_ap: list[float | None], images: int) -> Choice:
    """The largest of ``scales`` whose measured box AP is within ``MEASURE_TOLERANCE`` of the
    best; the rule's (last) scale when nothing scored."""
    measured = "; ".join(
        f"x{s:.2f}: {'nan' if ap is None else f'{ap:.1f}'}" for s, ap in zip(scales, box_ap)
    )
    figure = f"box AP of the pre-trained model on the {images}-image validation slice {measured}"
    scored = [(s, ap) for s, ap in zip(scales, box_ap) if ap is not None]
    best = max((ap for _, ap in scored), default=0.0)
    if best <= 0:
        return Choice(
            "scale", scales[-1], "the rule's scale: the measurement scored nothing", figure
        )
    chosen = max(s for s, ap in scored if ap >= MEASURE_TOLERANCE * best)
    rule = (
        f"measured: the largest scale within {MEASURE_TOLERANCE:.0%} of the best box AP on the "
        "validation slice"
    )
    return Choice("scale", chosen, rule, figure)


def schedule_split(scale_change: float) -> Choice:
    """The share of the budget that fine-tuning gets."""
    if scale_change > LARGE_SCALE_CHANGE:
        return Choice(
            "fine-tune share",
            FT_SHARE_LARGE_CHANGE,
            f"a large change of scale between the phases (> {LARGE_SCALE_CHANGE:g}x) needs "
            "fine-tune iterations to adapt",
            f"scale change {scale_change:.1f}x",
        )
    return Choice(
        "fine-tune share",
        FT_SHARE,
        "the demo's split (pre-training is the cheap phase: most of the budget)",
        f"scale change {scale_change:.1f}x",
    )


def _significant(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant digits."""
    return round(value, digits - math.ceil(math.log10(value)))


def phase_schedule(
    phase: str, seconds: float, seconds_per_iter: float, batch: int, num_images: int
) -> list[Choice]:
    """MAX_ITER filling ``seconds`` (EPOCHS says what it covers), LR steps, warmup, evaluation
    and checkpoint periods."""
    iters = max(MIN_ITERATIONS, int(seconds / seconds_per_iter))
    epochs = _significant(iters * batch / max(1, num_images))
    steps = () if phase == "PRETRAIN" else (_significant(0.75 * epochs),)
    warmup = min(max(iters // 5, MIN_WARMUP), 1000)
    return [
        Choice(
            "MAX_ITER",
            iters,
            "the phase's share of the budget",
            f"{seconds / 60:.1f} min at {seconds_per_iter:.2f} s/iteration",
        ),
        Choice(
            "EPOCHS",
            epochs,
            "what MAX_ITER covers (LR steps are in epochs)",
            f"{iters} iterations of {batch} images, {num_images} training images",
        ),
        Choice("DATASET_REPEAT", 1, "an epoch is the training set once (MAX_ITER sets the length)"),
        Choice(
            "STEP_EPOCHS",
            steps,
            "constant LR (the paper's pre-training)" if not steps else "LR x0.1 at 3/4",
        ),
        Choice(
            "WARMUP_ITERS",
            warmup,
            f"1/5 of the iterations, at least {MIN_WARMUP} (the demo's; a shorter phase warms "
            "up all along)",
        ),
        Choice("EVAL_PERIOD", max(1, iters // 4), "4 evaluations along the phase (not counted)"),
        Choice(
            "CHECKPOINT_PERIOD",
            max(MIN_ITERATIONS, min(iters, int(300 / seconds_per_iter))),
            "a checkpoint every 5 minutes of training",
        ),
    ]
