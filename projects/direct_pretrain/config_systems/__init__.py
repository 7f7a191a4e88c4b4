"""Config systems: yacs and LazyConfig, behind one interface (:class:`ConfigSystem`).

Each system loads its files, writes a resolved :class:`~direct_pretrain.phases.Phase` into a
phase config, and gives the pipeline what it reads from a config (folders, weights, datasets).
"""

from .base import ConfigSystem
from .lazy_system import LAZY_CONTROLLED_PATHS, LazySystem, lazy_phase_config, lazy_to_flat_dict
from .loading import changed_direct_pretrain_keys, load_config, system_of, user_set_keys
from .yacs_system import PHASE_CONTROLLED_KEYS, YacsSystem, phase_config, training_dicts

__all__ = [
    "LAZY_CONTROLLED_PATHS",
    "PHASE_CONTROLLED_KEYS",
    "ConfigSystem",
    "LazySystem",
    "YacsSystem",
    "changed_direct_pretrain_keys",
    "lazy_phase_config",
    "lazy_to_flat_dict",
    "load_config",
    "phase_config",
    "system_of",
    "training_dicts",
    "user_set_keys",
]
