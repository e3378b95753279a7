"""Turn images as people have them into the uint8 arrays the model takes.

Files come in any size and mode (grayscale, RGB, RGBA, palette, 16-bit), rotated by their
EXIF tag, sometimes truncated or not images at all. Preprocessing and serving both go
through :func:`to_array`, so a served image is converted exactly as training data was.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ResizePolicy = Literal["stretch", "pad", "crop"]

# What people keep photos and scans in; anything else PIL can open is refused on purpose.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "MPO"})
PIL_MODES = {1: "L", 3: "RGB"}
# Transparent pixels are laid over white, as image viewers show them.
BACKGROUND = (255, 255, 255)
RESAMPLING = Image.Resampling.BILINEAR


class UnreadableImage(ValueError):
    """A file that cannot be used as an image; the message says why."""


def _to_8bit(picture: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float images scaled to 8 bits (PIL's convert would clip them)."""
    pixels = np.asarray(picture)
    if picture.mode == "F":
        top = 1.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 255.0
        scaled = np.nan_to_num(pixels) * (255.0 / top)
    else:
        top = 65535 if picture.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255
        scaled = pixels.astype(np.float64) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _flatten(picture: Image.Image, channels: int) -> Image.Image:
    """Convert any mode to L or RGB, laying transparency over white."""
    if picture.mode.startswith("I") or picture.mode == "F":
        picture = _to_8bit(picture)
    if picture.mode == "P":
        picture = picture.convert("RGBA")
    if picture.mode in ("RGBA", "LA", "PA"):
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        picture = Image.alpha_composite(background, rgba)
    return picture.convert(PIL_MODES[channels])


def _resize(picture: Image.Image, height: int, width: int, policy: ResizePolicy) -> Image.Image:
    if picture.size == (width, height):
        return picture
    if policy == "stretch":
        return picture.resize((width, height), RESAMPLING)
    if policy == "crop":
        return ImageOps.fit(picture, (width, height), RESAMPLING)
    return ImageOps.pad(picture, (width, height), RESAMPLING, color=0)


def to_array(
    picture: Image.Image, height: int, width: int, channels: int, policy: ResizePolicy
) -> np.ndarray:
    """Convert a PIL image to uint8 ``(height, width, channels)`` by ``policy``."""
    picture = _resize(_flatten(picture, channels), height, width, policy)
    return np.asarray(picture, dtype=np.uint8).reshape(height, width, channels)


def load_image(
    path: Path, height: int, width: int, channels: int, policy: ResizePolicy
) -> tuple[np.ndarray, dict[str, object]]:
    """Decode the image file at ``path``; return its array and what the source was.

    Raises :class:`UnreadableImage` for empty, truncated, corrupt or non-image files.
    """
    if path.stat().st_size == 0:
        raise UnreadableImage("empty file")
    return _decode(path, height, width, channels, policy)


def decode_image(
    data: bytes, height: int, width: int, channels: int, policy: ResizePolicy
) -> np.ndarray:
    """Decode the bytes of an image file (a PNG or JPEG sent to the server, say) as a file."""
    if not data:
        raise UnreadableImage("empty file")
    return _decode(io.BytesIO(data), height, width, channels, policy)[0]


def _decode(
    source: Path | BinaryIO, height: int, width: int, channels: int, policy: ResizePolicy
) -> tuple[np.ndarray, dict[str, object]]:
    try:
        with Image.open(source) as picture:
            if picture.format not in IMAGE_FORMATS:
                raise UnreadableImage(f"unsupported image format {picture.format}")
            info = {
                "format": picture.format,
                "mode": picture.mode,
                "width": picture.width,
                "height": picture.height,
            }
            if picture.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the photo is much bigger
                # than the target: far less work and memory for large photos.
                picture.draft(PIL_MODES[channels], (width, height))
            picture.load()
            picture = ImageOps.exif_transpose(picture)
            return to_array(picture, height, width, channels, policy), info
    except UnidentifiedImageError:
        raise UnreadableImage("not an image") from None
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"too many pixels: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, UnreadableImage):
            raise
        raise UnreadableImage(f"corrupt or truncated: {error}") from None


def resize_images(
    images: np.ndarray, height: int, width: int, channels: int, policy: ResizePolicy = "stretch"
) -> np.ndarray:
    """Resize and convert a uint8 array of images to ``(N, height, width, channels)``."""
    if images.shape[1:] == (height, width, channels):
        return images
    if images.shape[-1] not in PIL_MODES:
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[-1]}")
    out = np.empty((len(images), height, width, channels), dtype=np.uint8)
    source_mode = PIL_MODES[images.shape[-1]]
    for index, pixels in enumerate(images):
        picture = Image.fromarray(pixels[..., 0] if source_mode == "L" else pixels, source_mode)
        out[index] = to_array(picture, height, width, channels, policy)
    return out
