"""Loading weights for evaluation, and a single-image predictor for reports."""

from __future__ import annotations

import logging

import torch
from detectron2.data import transforms as T

from .bridge import bridge_state_dict, load_model_state
from .checkpoint import SafeCheckpointer
from .kinds import ConfigKind
from .phases import phase_node

__all__ = ["load_weights_strictly", "predictor"]

logger = logging.getLogger(__name__)


def load_weights_strictly(model, weights: str) -> None:
    """Load ``weights`` into ``model``; a checkpoint that does not fit is an error naming the
    keys (norm statistics convert as in the bridge). Legacy ``.pkl`` files go through
    Detectron2's name-matching loader."""
    if weights.endswith(".pkl"):
        SafeCheckpointer(model).load(weights)
        return
    state, report = bridge_state_dict(
        load_model_state(weights), model, reinit_on_class_change=False, source_name=weights
    )
    model.load_state_dict(state)
    logger.info(report.summary())


def predictor(kind: ConfigKind, pcfg, weights: str):
    """image (HWC, the config's format) -> Instances of the final model, on CPU."""
    model = kind.build_model(pcfg)
    load_weights_strictly(model, weights)
    model.eval()
    node = phase_node(pcfg)
    resize = T.ResizeShortestEdge(node.MIN_SIZE_TEST, node.MAX_SIZE_TEST)

    def predict(image):
        tensor = resize.get_transform(image).apply_image(image)
        inputs = {
            "image": torch.as_tensor(tensor.astype("float32").transpose(2, 0, 1)),
            "height": image.shape[0],
            "width": image.shape[1],
        }
        with torch.no_grad():
            return model([inputs])[0]["instances"].to("cpu")

    return predict
