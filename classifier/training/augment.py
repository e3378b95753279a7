"""Training-time augmentation: random shifts; rotation, scale and sub-pixel shift; or, for
photos, a random crop, flip, rotation and colour jitter.

Each epoch's draws come from (seed, epoch), so a resumed run sees the same images as an
uninterrupted one. Nothing here goes into the saved model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# augment: shift moves each image by up to this fraction of its height and width
# (2 pixels at 28x28), drawn per image and epoch; the border is filled with black.
SHIFT_FRACTION = 2 / 28
# augment: affine also rotates each image by up to this many degrees either way and scales
# it by up to this fraction, about its centre, then shifts it (not by whole pixels) as
# above; bilinear sampling, black border.
AFFINE_MAX_DEGREES = 10.0
AFFINE_MAX_SCALE = 0.1
# warp_images frames each image by this share of its size (black or its edge repeated):
# more than any sample point of the augmentations here strays outside it.
WARP_MARGIN = 0.25


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
    A = rotation * diag(scale, scale_x), image by image in Pillow. ``scales_x``
    (default: ``scales``) scales the width on its own; a negative one mirrors the image.
    ``border`` is what lies outside the image: ``black``, or ``edge`` (the nearest edge
    pixel, for photos).
    """
    count, height, width, channels = images.shape
    angles = np.deg2rad(degrees)
    scales_x = scales if scales_x is None else scales_x
    # A^-1 row by row, in (row, column) order: the inverse rotation over each axis's scale.
    yy, yx = np.cos(angles) / scales, np.sin(angles) / scales
    xy, xx = np.sin(angles) / scales_x, np.cos(angles) / scales_x
    shift_y, shift_x = np.asarray(shifts, np.float64).T
    # Pillow's affine transform (C, about 8x faster than numpy here) maps each output
    # point (x, y), pixel centres at +0.5, to the input point (a x + b y + c, d x + e y + f).
    # The images get a frame of MARGIN of their size, black or their edge repeated, so
    # every sample point lies inside it.
    pad_y, pad_x = (max(1, int(np.ceil(size * WARP_MARGIN))) for size in (height, width))
    mode = {"black": "constant", "edge": "edge"}[border]
    a, b = xx, xy
    d, e = -yx, yy
    c = width / 2 + pad_x - a * (width / 2 + shift_x) - b * (height / 2 + shift_y)
    f = height / 2 + pad_y - d * (width / 2 + shift_x) - e * (height / 2 + shift_y)
    out = np.empty_like(images)
    pil_mode = {1: "L", 3: "RGB"}[channels]
    for index in range(count):
        framed = np.pad(images[index], ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode=mode)
        picture = Image.fromarray(framed[..., 0] if channels == 1 else framed, pil_mode)
        warped = picture.transform(
            (width, height),
            Image.Transform.AFFINE,
            (a[index], b[index], c[index], d[index], e[index], f[index]),
            resample=Image.Resampling.BILINEAR,
        )
        out[index] = np.asarray(warped).reshape(height, width, channels)
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
JITTER_BLOCK = 64


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
    out = np.empty_like(images)
    rgb = images.shape[-1] == 3
    for start in range(0, len(images), JITTER_BLOCK):  # in float32 blocks that stay in cache
        block = slice(start, start + JITTER_BLOCK)
        pixels = images[block].astype(np.float32)
        pixels *= brightness[block, None, None, None]
        grey = pixels @ LUMA[:, None] if rgb else pixels
        mean = grey.mean(axis=(1, 2, 3), keepdims=True)
        pixels -= mean
        pixels *= contrast[block, None, None, None]
        pixels += mean
        if rgb:
            grey = pixels @ LUMA[:, None]
            pixels -= grey
            pixels *= saturation[block, None, None, None]
            pixels += grey
        out[block] = np.clip(np.rint(pixels, out=pixels), 0, 255, out=pixels)
    return out


AUGMENTATIONS = {"shift": shift_images, "affine": affine_images, "photo": photo_images}


def augment_epoch(images: np.ndarray, kind: str, seed: int, epoch: int) -> np.ndarray:
    """``images`` augmented by ``train.augment`` ``kind`` for ``epoch`` (as they are for none)."""
    if kind == "none":
        return images
    return AUGMENTATIONS[kind](images, np.random.default_rng([seed, epoch, 1]))
