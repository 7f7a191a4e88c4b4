"""Loading a config file of either system, and finding a config's system."""

from __future__ import annotations

import os

import yaml
from detectron2.config import CfgNode, LazyConfig
from omegaconf import DictConfig, OmegaConf

from ..config import check_lazy_node, default_direct_pretrain, get_cfg, user_keys
from ..phases import check_phase_controlled
from ..utils.io import flatten_dict, plain
from .base import ConfigSystem
from .lazy_system import LAZY_CONTROLLED_PATHS, LazySystem
from .yacs_system import PHASE_CONTROLLED_KEYS, YacsSystem

__all__ = ["changed_direct_pretrain_keys", "load_config", "system_of", "user_set_keys"]

_MISSING = object()


def system_of(cfg) -> ConfigSystem:
    """The :class:`ConfigSystem` of ``cfg`` (a yacs ``CfgNode`` or a LazyConfig ``DictConfig``)."""
    if isinstance(cfg, CfgNode):
        return YacsSystem()
    if isinstance(cfg, DictConfig):
        return LazySystem()
    raise TypeError(f"unsupported config type {type(cfg).__name__}")


def load_config(path: str, opts: list[str] = ()):
    """Load a yacs ``.yaml`` or a LazyConfig ``.py`` config and apply command-line overrides.

    yacs takes ``KEY VALUE`` pairs, LazyConfig ``a.b=c``; a LazyConfig override of a key the
    config does not have is refused (Detectron2 would add it silently). Keys that each phase
    sets are refused outside ``DIRECT_PRETRAIN.<PHASE>``, naming the phase keys to use.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file '{path}' not found")
    if not path.endswith(".py"):
        cfg = get_cfg()
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts))
        cfg.freeze()
        check_phase_controlled(cfg, user_keys(path, opts), PHASE_CONTROLLED_KEYS)
        return cfg
    cfg = LazyConfig.load(path)
    for opt in opts:
        key, sep, _ = opt.partition("=")
        if not sep:
            raise ValueError(f"LazyConfig override '{opt}' is not of the form a.b=c")
        if OmegaConf.select(
            cfg, key.lstrip("+"), default=_MISSING
        ) is _MISSING and not key.startswith("+"):
            raise KeyError(
                f"Non-existent config key: {key} (in {path}; prefix it with '+' "
                "to add a new key)"
            )
    cfg = LazyConfig.apply_overrides(cfg, [o.lstrip("+") for o in opts])
    if "DIRECT_PRETRAIN" not in cfg:
        raise KeyError(
            f"{path} defines no DIRECT_PRETRAIN node (use "
            "direct_pretrain.config.default_direct_pretrain())"
        )
    check_lazy_node(cfg.DIRECT_PRETRAIN)
    opt_keys = {opt.partition("=")[0].lstrip("+"): "the command line" for opt in opts}
    check_phase_controlled(cfg, opt_keys, LAZY_CONTROLLED_PATHS)
    return cfg


def user_set_keys(path: str, opts: list[str] = ()) -> dict[str, str]:
    """The keys the user set, ``{key: where}``, which a plan keeps: for a yacs file the keys
    it (or its non-model-zoo bases) and ``opts`` set; for a LazyConfig file the overrides in
    ``opts`` and the ``DIRECT_PRETRAIN`` keys whose value differs from the defaults."""
    if not path.endswith(".py"):
        return user_keys(path, opts)
    keys = {opt.partition("=")[0].lstrip("+"): "the command line" for opt in opts}
    return {**changed_direct_pretrain_keys(LazyConfig.load(path), path), **keys}


def changed_direct_pretrain_keys(cfg, where: str = "the config") -> dict[str, str]:
    """``{key: where}`` of the ``DIRECT_PRETRAIN`` keys of ``cfg`` (either system) whose value
    differs from the default."""
    node = cfg.DIRECT_PRETRAIN
    tree = (
        OmegaConf.to_container(node)
        if isinstance(node, DictConfig)
        else yaml.safe_load(node.dump())
    )
    defaults = flatten_dict(default_direct_pretrain(), "DIRECT_PRETRAIN.")
    return {
        key: where
        for key, value in flatten_dict(tree, "DIRECT_PRETRAIN.").items()
        if plain(value) != plain(defaults.get(key))
    }
