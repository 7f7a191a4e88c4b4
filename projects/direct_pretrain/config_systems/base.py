"""What the pipeline needs from a config system; :mod:`.yacs_system` and :mod:`.lazy_system`
implement it for Detectron2's two config systems."""

from __future__ import annotations

from ..phases import Phase, resolve_phase

__all__ = ["ConfigSystem"]


class ConfigSystem:
    """Accessors and builders of one config system; each method takes the config it acts on.

    ``cfg`` is a pipeline config, ``pcfg`` a resolved phase config (:meth:`phase_config`).
    """

    # Flat keys that may change between a run and its resume without changing the result.
    resume_safe_keys: tuple[str, ...] = ()
    # Names of the output folder, device and initial-weights settings.
    output_dir_key: str = ""
    device_key: str = ""
    weights_key: str = ""
    # The override that keeps training images without usable annotations, for messages.
    keep_empty_override: str = ""

    def resolve(self, cfg, name: str) -> Phase:
        """The checked settings of phase ``name`` of ``cfg``."""
        return resolve_phase(cfg, name, self.device(cfg))

    def phase(self, pcfg) -> Phase:
        """The settings of the phase a resolved phase config belongs to."""
        return self.resolve(pcfg, pcfg.DIRECT_PRETRAIN.PHASE)

    def dataset_names(self, cfg) -> list[str]:
        """Training then test dataset names."""
        train, test = self.split_names(cfg)
        return [*train, *test]

    def anchor_layout(self, cfg) -> tuple[str, str, list[str]] | None:
        """Config keys of the anchor sizes and aspect ratios and the anchored feature maps'
        names, or None for a detector without a ``DefaultAnchorGenerator`` (e.g. FCOS)."""
        return None

    def has_roi_heads(self, cfg) -> bool:
        """Whether the detector samples RoIs (ROI_BATCH_SIZE_PER_IMAGE applies)."""
        return False

    def output_dir(self, cfg) -> str: ...
    def weights(self, cfg) -> str: ...
    def device(self, cfg) -> str: ...
    def seed(self, cfg) -> int: ...  # negative: a random one
    def num_classes(self, cfg) -> dict[str, int]: ...
    def pixel_stats(self, cfg) -> tuple[list[float], list[float]]: ...
    def with_weights(self, cfg, path: str): ...
    def with_pixel_stats(self, cfg, mean: list[float], std: list[float]): ...
    def with_values(self, cfg, values: dict): ...  # {dotted key: value}, a changed copy
    def split_names(self, cfg) -> tuple[list[str], list[str]]: ...
    def with_train_names(self, cfg, names: list[str]): ...
    def for_evaluation(self, pcfg, dataset: str, output_dir: str): ...  # output in its inference/
    def save_pipeline(self, cfg, path: str) -> None: ...
    def check(self, cfg) -> None: ...
    def train_dicts(self, cfg) -> list[dict]: ...
    def image_format(self, cfg) -> str: ...
    def phase_config(self, cfg, phase: Phase, num_images: int): ...
    def build_model(self, pcfg, on_cpu: bool = False): ...
    def inference_size(self, pcfg) -> tuple[int, int]: ...
    def save(self, pcfg, path: str) -> None: ...
    def flat(self, pcfg) -> dict: ...
