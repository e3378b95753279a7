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
    images: np.ndarray, degrees: np.ndarray, scales: np.ndarray, shifts: np.ndarray
) -> np.ndarray:
    """Rotate each image clockwise (as displayed) by its degrees, scale it about its centre,
    then shift it by its (down, right) pixels; bilinear sampling, black border.

    Output pixel p samples the input at ``centre + A^-1 (p - centre - shift)`` with
    A = scale * rotation, vectorised over blocks of images.
    """
    count, height, width, _ = images.shape
    angles = np.deg2rad(degrees)
    cos = (np.cos(angles) / scales).astype(np.float32)[:, None, None]
    sin = (np.sin(angles) / scales).astype(np.float32)[:, None, None]
    shifts = np.asarray(shifts, np.float32)[..., None, None]
    centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float32) - centre_y,
        np.arange(width, dtype=np.float32) - centre_x,
        indexing="ij",
    )
    # A one-pixel black frame: every sample point is clipped into it, so no bounds checks.
    framed = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty_like(images)
    for start in range(0, count, AFFINE_BLOCK):
        block = slice(start, start + AFFINE_BLOCK)
        dy, dx = rows - shifts[block, 0], cols - shifts[block, 1]
        # The inverse rotation divided by the scale, in the framed image's coordinates.
        source_y = cos[block] * dy - sin[block] * dx + (centre_y + 1)
        source_x = sin[block] * dy + cos[block] * dx + (centre_x + 1)
        out[block] = _bilinear(framed[block], source_y, source_x)
    return out


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


AUGMENTATIONS = {"shift": shift_images, "affine": affine_images}


def augment_epoch(images: np.ndarray, kind: str, seed: int, epoch: int) -> np.ndarray:
    """``images`` augmented by ``train.augment`` ``kind`` for ``epoch`` (as they are for none)."""
    if kind == "none":
        return images
    return AUGMENTATIONS[kind](images, np.random.default_rng([seed, epoch, 1]))
