"""One predictor for every config system: evaluation examples, the report and ``predict.py``."""

from __future__ import annotations

import copy

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .bridge import load_weights_strictly
from .config_systems import system_of
from .config_systems.lazy_system import lazy_test_resize

__all__ = ["Predictor", "inference_size"]


def inference_size(cfg) -> tuple[int, int]:
    """The model's test resize: (short side, long-side cap) of the config."""
    return system_of(cfg).inference_size(cfg)


class Predictor:
    """Detectron2's ``DefaultPredictor`` for either config kind, with strict weight loading.

    Takes one BGR image (HWC uint8, as ``DefaultPredictor``), applies the model's test
    resize and input format and returns the model's output dict (``"instances"`` in the
    input image's pixels); :meth:`predict_batch` takes several in one forward pass. A
    checkpoint that does not fit the model is an error naming the keys.
    """

    def __init__(self, cfg) -> None:
        if not isinstance(cfg, CfgNode):
            self.model = instantiate(copy.deepcopy(cfg.model)).to(cfg.train.device)
            weights = cfg.train.init_checkpoint
            resize = lazy_test_resize(cfg)
            self.aug = T.ResizeShortestEdge(resize.short_edge_length, resize.max_size)
            self.input_format = cfg.dataloader.test.mapper.image_format
        else:
            self.model = build_model(cfg)
            weights = cfg.MODEL.WEIGHTS
            min_size, max_size = inference_size(cfg)
            self.aug = T.ResizeShortestEdge([min_size, min_size], max_size)
            self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"input format '{self.input_format}' is not RGB or BGR")
        self.model.eval()
        load_weights_strictly(self.model, weights)

    def __call__(self, original_image) -> dict:
        return self.predict_batch([original_image])[0]

    def predict_batch(self, original_images: list) -> list[dict]:
        """Images (BGR, HWC uint8) in one forward pass; their output dicts, in order.
        Images of one size (tiles) are padded alike, so each gives what it gives alone."""
        inputs = []
        for original_image in original_images:
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": image, "height": height, "width": width})
        with torch.no_grad():
            return self.model(inputs)
