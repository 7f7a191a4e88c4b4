"""The project's one image reader: upright, correctly converted, or an error naming the file.

:func:`read_image_checked` gives the same array as Detectron2's ``read_image`` for ordinary
8-bit images (RGB, grayscale, RGBA: alpha dropped), and differs where that one is silently
wrong or unhelpful:

* 16-bit grayscale ("I;16*", and "I" holding values in 0..65535, as older Pillow opens 16-bit
  PNGs) is scaled to 0-255 by the 16-bit range (value / 257, rounded) instead of being clipped
  at 255 (an all-white image). Pillow itself reduces 16-bit RGB(A) PNGs to 8 bits per channel.
* palette ("P", "PA"), bilevel ("1"), "LA", "RGBX", "CMYK" and "YCbCr" images go through
  Pillow's conversion; any other mode (float "F", "LAB", "HSV", 32-bit integers beyond
  0..65535, ...) has no known 0-255 mapping and is refused.
* every decode failure (missing file, unknown format, truncated or corrupt data) is a
  :class:`BadImageError` naming the file. A truncated file is never half-decoded: Pillow's
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False and the whole image is decoded here.

The EXIF orientation is applied, as Detectron2 does, so the array is upright; a dataset whose
width/height were taken from the stored (un-rotated) pixels then disagrees with it, which
:func:`check_image_size` reports.
"""

from __future__ import annotations

import logging

import numpy as np
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

from ..utils.errors import UserError

__all__ = [
    "BAD_IMAGES_HINT",
    "BadImageError",
    "ImageSizeError",
    "IMAGE_FORMATS",
    "check_image_size",
    "open_image_checked",
    "read_image_checked",
]

logger = logging.getLogger(__name__)

# Output formats (Detectron2's INPUT.FORMAT values for 8-bit images).
IMAGE_FORMATS = ("BGR", "RGB", "L")
# 8-bit modes whose Pillow conversion to RGB / L is right.
_PIL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_MAX_16BIT = 65535
# What a user can do about a bad image, appended to errors of passes that honour BAD_IMAGES.
BAD_IMAGES_HINT = (
    "Fix or remove it, or set DIRECT_PRETRAIN.BAD_IMAGES skip to leave such images out"
)


class BadImageError(UserError, RuntimeError):
    """An image of the dataset cannot be read, decoded or converted; the message names it."""


class ImageSizeError(BadImageError):
    """An image's decoded size differs from the width/height its dataset gives."""


def _upright(image: Image.Image, path: str) -> Image.Image:
    """``image`` turned by its EXIF orientation tag (unchanged without one)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:  # noqa: BLE001 - Pillow's EXIF parser raises assorted types
        logger.warning("Image '%s': unreadable EXIF data (%s); using it as stored", path, e)
    return image


def _to_8bit(image: Image.Image, path: str) -> Image.Image:
    """``image`` in a mode that Pillow converts correctly to RGB and L."""
    if image.mode in _PIL_MODES:
        return image
    if image.mode in _MODES_16BIT or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > _MAX_16BIT):
            raise BadImageError(
                f"image '{path}': mode I (32-bit integer) with values {values.min()}.."
                f"{values.max()}, outside the 16-bit range 0..{_MAX_16BIT}: no known "
                "0-255 mapping; convert it to 8 bits yourself"
            )
        scaled = np.rint(values.astype(np.float64) / (_MAX_16BIT / 255)).astype(np.uint8)
        return Image.fromarray(scaled, mode="L")
    raise BadImageError(
        f"image '{path}': mode {image.mode} has no known conversion to 8-bit "
        f"{'/'.join(IMAGE_FORMATS)} (supported: {', '.join(_PIL_MODES + _MODES_16BIT)} and "
        "16-bit I); convert it to 8-bit RGB yourself"
    )


def open_image_checked(path: str, mode: str = "RGB") -> Image.Image:
    """Decode ``path`` once into an upright 8-bit Pillow image in ``mode`` ("RGB" or "L").

    An image already in ``mode`` is returned as decoded (no converted copy): a large image
    can then be cut into tiles (``crop``) without a second full-size array.

    Raises:
        BadImageError: as :func:`read_image_checked`.
    """
    try:
        with PathManager.open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decode all of it now: truncation raises here, not later
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image '{path}': {type(e).__name__}: {e}") from e
    image = _to_8bit(_upright(image, path), path)
    return image if image.mode == mode else image.convert(mode)


def read_image_checked(path: str, image_format: str) -> np.ndarray:
    """Read ``path`` as an upright HWC uint8 array in ``image_format`` ("BGR", "RGB" or "L").

    Raises:
        BadImageError: the file is missing, not an image, truncated or corrupt, or in a mode
            with no correct 8-bit conversion; the message names the file.
        ValueError: ``image_format`` is not supported.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"image format '{image_format}' is not supported: use one of {IMAGE_FORMATS}"
        )
    array = np.asarray(open_image_checked(path, "RGB" if image_format == "BGR" else image_format))
    if image_format == "L":
        return np.expand_dims(array, -1)
    return array[:, :, ::-1] if image_format == "BGR" else array


def check_image_size(path: str, image: np.ndarray, width: int, height: int) -> None:
    """Raise :class:`ImageSizeError` if ``image`` (HWC) is not ``width`` x ``height``."""
    got_height, got_width = image.shape[:2]
    if (got_width, got_height) == (width, height):
        return
    turned = (
        " (turned by 90 degrees: the file likely has an EXIF orientation tag, which is "
        "applied when reading, while the dataset's size is the stored one)"
        if (got_width, got_height) == (height, width)
        else ""
    )
    raise ImageSizeError(
        f"image '{path}' is {got_width}x{got_height} (width x height) as decoded, but its "
        f"dataset says {width}x{height}{turned}; its boxes would not fit it. Correct the "
        "width/height (and boxes) in the dataset file, or re-save the image upright"
    )
