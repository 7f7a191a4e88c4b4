"""Direct detection pre-training and AlignDet box-domain pre-training for Detectron2."""

from .config import add_direct_pretrain_config, get_cfg

__all__ = ["add_direct_pretrain_config", "get_cfg"]
