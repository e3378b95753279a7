"""Training-time augmentation: random shifts, or rotation, scale and sub-pixel shift.

Each epoch's draws come from (seed, epoch), so a resumed run sees the same images as an
uninterrupted one. Nothing here goes into the saved model.
"""

from __future__ import annotations

import numpy as np

# augment: shift moves each image by up to this fraction of its height and width
# (2 pixels at 28x28), drawn per image and epoch; the border is filled with black.
SHIFT_FRACTION = 2 / 28
# augment: affine also rotates each image by up to this many degrees either way and scales
# it by up to this fraction, about its centre, then shifts it (not by whole pixels) as
# above; bilinear sampling, black border.
AFFINE_MAX_DEGREES = 10.0
AFFINE_MAX_SCALE = 0.1
# Images transformed per block, so the sampling grids stay a few tens of MB.
AFFINE_BLOCK = 2048


def _window(shift: int, size: int) -> tuple[slice, slice]:
    """(destination, source) slices that move an axis of ``size`` by ``shift`` pixels."""
    return slice(max(shift, 0), size + min(shift, 0)), slice(max(-shift, 0), size - max(shift, 0))


def shift_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by a random whole number of pixels in each direction, black border."""
    _, height, width, _ = images.shape
    most = [max(1, round(size * SHIFT_FRACTION)) for size in (height, width)]
    shifts = np.stack([rng.integers(-m, m + 1, size=len(images)) for m in most], axis=1)
    shifted = np.zeros_like(images)
    for dy in range(-most[0], most[0] + 1):
        rows_to, rows_from = _window(dy, height)
        for dx in range(-most[1], most[1] + 1):
            chosen = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            cols_to, cols_from = _window(dx, width)
            shifted[chosen, rows_to, cols_to] = images[chosen, rows_from, cols_from]
    return shifted


def affine_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image rotated, scaled and shifted at random about its centre; black border."""
    count, height, width, _ = images.shape
    return warp_images(
        images,
        degrees=rng.uniform(-AFFINE_MAX_DEGREES, AFFINE_MAX_DEGREES, count),
        scales=rng.uniform(1 - AFFINE_MAX_SCALE, 1 + AFFINE_MAX_SCALE, count),
        shifts=rng.uniform(-SHIFT_FRACTION, SHIFT_FRACTION, (count, 2)) * (height, width),
    )


def warp_images(
    images: np.ndarray,
    degrees: np.ndarray,
    scales: np.ndarray,
    shifts: np.ndarray,
    *,
    scales_x: np.ndarray | None = None,
    border: str = "black",
) -> np.ndarray:
    """Rotate each image clockwise (as displayed) by its degrees, scale it about its centre,
    then shift it by its (down, right) pixels; bilinear sampling.

    Output pixel p samples the input at ``centre + A^-1 (p - centre - shift)`` with
    A = rotation * diag(scale, scale_x), vectorised over blocks of images. ``scales_x``
    (default: ``scales``) scales the width on its own; a negative one mirrors the image.
    ``border`` is what lies outside the image: ``black``, or ``edge`` (the nearest edge
    pixel, for photos).
    """
    count, height, width, _ = images.shape
    angles = np.deg2rad(degrees)
    scales_x = scales if scales_x is None else scales_x
    # The inverse rotation, row by row, divided by the scale of each axis.
    yy = (np.cos(angles) / scales).astype(np.float32)[:, None, None]
    yx = (np.sin(angles) / scales).astype(np.float32)[:, None, None]
    xy = (np.sin(angles) / scales_x).astype(np.float32)[:, None, None]
    xx = (np.cos(angles) / scales_x).astype(np.float32)[:, None, None]
    shifts = np.asarray(shifts, np.float32)[..., None, None]
    centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float32) - centre_y,
        np.arange(width, dtype=np.float32) - centre_x,
        indexing="ij",
    )
    # A one-pixel frame (black, or the edge repeated): every sample point is clipped into
    # it, so no bounds checks.
    mode = {"black": "constant", "edge": "edge"}[border]
    framed = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)
    out = np.empty_like(images)
    block_size = max(1, AFFINE_BLOCK * 28 * 28 // (height * width))
    for start in range(0, count, block_size):
        block = slice(start, start + block_size)
        dy, dx = rows - shifts[block, 0], cols - shifts[block, 1]
        source_y = yy[block] * dy - yx[block] * dx + (centre_y + 1)
        source_x = xy[block] * dy + xx[block] * dx + (centre_x + 1)
        out[block] = _bilinear(framed[block], source_y, source_x)
    return out


# augment: photo, as for photos people take: a random crop of PHOTO_MIN_AREA to all of the
# image, of aspect 3/4 to 4/3, resized back; a horizontal flip half the time; a rotation up
# to PHOTO_MAX_DEGREES; brightness, contrast and saturation each within +-PHOTO_JITTER.
# Edges are repeated rather than black.
PHOTO_MIN_AREA = 0.6
PHOTO_MAX_ASPECT = 4 / 3
PHOTO_MAX_DEGREES = 10.0
PHOTO_JITTER = 0.2
# ITU-R BT.601 luma weights: the grey of an RGB pixel.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def photo_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image randomly cropped and resized, flipped, rotated, and its colours jittered."""
    count, height, width, _ = images.shape
    area = rng.uniform(PHOTO_MIN_AREA, 1.0, count)
    aspect = np.exp(rng.uniform(-np.log(PHOTO_MAX_ASPECT), np.log(PHOTO_MAX_ASPECT), count))
    crop_y = np.minimum(1.0, np.sqrt(area / aspect))  # the crop's share of each side
    crop_x = np.minimum(1.0, np.sqrt(area * aspect))
    # Where the crop sits: anywhere it stays inside the image.
    shifts = rng.uniform(-0.5, 0.5, (count, 2)) * np.stack([1 - crop_y, 1 - crop_x], 1)
    flips = np.where(rng.random(count) < 0.5, -1.0, 1.0)
    warped = warp_images(
        images,
        degrees=rng.uniform(-PHOTO_MAX_DEGREES, PHOTO_MAX_DEGREES, count),
        scales=1 / crop_y,
        scales_x=flips / crop_x,
        shifts=shifts * (height, width) / np.stack([crop_y, crop_x], 1),
        border="edge",
    )
    factors = rng.uniform(1 - PHOTO_JITTER, 1 + PHOTO_JITTER, (count, 3)).astype(np.float32)
    return jitter_colours(warped, brightness=factors[:, 0], contrast=factors[:, 1],
                          saturation=factors[:, 2])  # fmt: skip


def jitter_colours(
    images: np.ndarray, brightness: np.ndarray, contrast: np.ndarray, saturation: np.ndarray
) -> np.ndarray:
    """Scale each image's brightness, its contrast about its mean grey, and (RGB) its
    saturation about each pixel's grey, by its factors; clipped to 0..255."""
    pixels = images.astype(np.float32) * brightness[:, None, None, None]
    grey = pixels @ LUMA[:, None] if images.shape[-1] == 3 else pixels
    mean = grey.mean(axis=(1, 2, 3), keepdims=True)
    pixels = mean + (pixels - mean) * contrast[:, None, None, None]
    if images.shape[-1] == 3:
        grey = pixels @ LUMA[:, None]
        pixels = grey + (pixels - grey) * saturation[:, None, None, None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _bilinear(framed: np.ndarray, source_y: np.ndarray, source_x: np.ndarray) -> np.ndarray:
    """Sample each framed image (black outer pixels) at its points, bilinearly, as uint8."""
    count, height, width, channels = framed.shape
    source_y = np.clip(source_y, 0, height - 1)
    source_x = np.clip(source_x, 0, width - 1)
    top = np.minimum(source_y.astype(np.int32), height - 2)
    left = np.minimum(source_x.astype(np.int32), width - 2)
    weight_y, weight_x = (source_y - top)[..., None], (source_x - left)[..., None]
    corner = (np.arange(count, dtype=np.int32) * (height * width))[:, None, None] + (
        top * width + left
    )
    flat = framed.reshape(-1, channels).astype(np.float32)
    upper = flat[corner] * (1 - weight_x) + flat[corner + 1] * weight_x
    lower = flat[corner + width] * (1 - weight_x) + flat[corner + width + 1] * weight_x
    total = upper * (1 - weight_y) + lower * weight_y
    return np.clip(np.rint(total), 0, 255).astype(framed.dtype)


AUGMENTATIONS = {"shift": shift_images, "affine": affine_images, "photo": photo_images}


def augment_epoch(images: np.ndarray, kind: str, seed: int, epoch: int) -> np.ndarray:
    """``images`` augmented by ``train.augment`` ``kind`` for ``epoch`` (as they are for none)."""
    if kind == "none":
        return images
    return AUGMENTATIONS[kind](images, np.random.default_rng([seed, epoch, 1]))
