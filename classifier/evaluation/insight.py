"""What the network looks at: Grad-CAM heatmaps, feature maps, the first layer's filters.

Grad-CAM (Selvaraju et al., 2017): the gradient of a class's score (its logit, before the
temperature and the softmax) with respect to the last convolutional feature map, averaged
over the map, weighs the map's channels; their weighted sum, through a ReLU, shows where
the evidence for that class lies. The last feature map is the input of the layer that
turns maps into a vector (``Flatten`` or a global pooling), so the same code finds it in
the reference CNN (``conv3``), the small models and a keras.applications backbone nested
as one layer (its output, in the outer model's graph).

Everything is Keras 3 (``keras.ops``, functional models cut at a tensor) except one small
function, :func:`class_score_gradients`: Keras 3 has no backend-agnostic gradient
(keras-team/keras#19220, #20760: "use backend specific APIs"), so it holds one short branch
per backend, TensorFlow's ``GradientTape``, ``jax.grad`` and torch's autograd.

The pictures are mosaics: each is one image drawn once, with captions, which keeps them
cheap (a figure with a hundred small axes takes seconds to draw).

A model that averages each image with its mirror (``train.tta: hflip``,
classifier/model/tta.py) is looked into one view at a time: the pictures show the network
on the image as it is, through :func:`classifier.model.tta.single_view`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from classifier.data.dataset import ImageSet
from classifier.model.temperature import LOGITS_LAYER, with_temperature
from classifier.model.tta import single_view

log = logging.getLogger(__name__)

MISTAKES_SHOWN = 12  # the most confidently misclassified test images
CORRECT_PER_CLASS = 3  # correctly classified test images of each class
CLASSES_SHOWN = 10  # rows of the feature maps and of the correct Grad-CAMs, at most
CHANNELS_SHOWN = 12  # feature maps per image: the channels that vary most on the shown images
FILTERS_SHOWN = 64
FEATURE_MAP_INCHES = 0.7  # a feature-map tile's width on the page
FILTER_INCHES = 0.5
MAX_WIDTH_INCHES = 12.0
MARGIN_INCHES = 0.1
TITLE_INCHES = 0.5
HEAT_ALPHA = 0.45  # how much of a Grad-CAM tile is heat, the rest the image
INSIGHT_DIR = "insight"  # the pictures' folder inside the evaluate plots folder
# Layers that end a convolution block: the last of these at each spatial size.
BLOCK_LAYERS = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.Add,
    keras.layers.Multiply,
)


# --- Grad-CAM --------------------------------------------------------------------------------


def with_logits(model: keras.Model) -> keras.Model:
    """``model``, with a ``logits`` layer: saved calibrated models have one, others get it."""
    if LOGITS_LAYER in {layer.name for layer in model.layers}:
        return model
    return with_temperature(model, 1.0)  # splits the softmax Dense; same weights


def last_feature_map(model: keras.Model) -> keras.KerasTensor:
    """The last convolutional feature map: the input of the layer that makes it a vector."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or isinstance(layer.input, list | tuple):
            continue  # the input itself; a merge (Add, Concatenate) keeps maps as maps
        if len(layer.input.shape) == 4 and len(layer.output.shape) == 2:
            return layer.input
    raise ValueError(f"model {model.name} has no layer that turns a feature map into a vector")


def class_score_gradients(head: keras.Model, features: object, classes: np.ndarray) -> object:
    """d(score of ``classes[i]`` for image i) / d(``features``), for every image at once.

    Each image's score depends on its own features only, so the gradient of their sum is
    each image's own gradient. The one backend-specific function here (see the module
    docstring); the TensorFlow branch is the one the tests run.
    """
    one_hot = keras.ops.one_hot(keras.ops.convert_to_tensor(classes), head.output.shape[-1])

    def total_score(feature_maps):
        return keras.ops.sum(head(feature_maps, training=False) * one_hot)

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(features)
            score = total_score(features)
        return tape.gradient(score, features)
    if backend == "jax":
        import jax

        return jax.grad(total_score)(features)
    if backend == "torch":
        watched = features.detach().requires_grad_(True)
        total_score(watched).backward()
        return watched.grad
    raise NotImplementedError(f"Grad-CAM has no gradient for the Keras backend {backend!r}")


def class_activation_maps(
    model: keras.Model, images: np.ndarray, classes: np.ndarray
) -> np.ndarray:
    """Grad-CAM of ``classes[i]`` on ``images[i]`` at the feature map's size, each in 0..1."""
    scored = with_logits(single_view(model))
    feature_map = last_feature_map(scored)
    features = keras.Model(scored.inputs[0], feature_map)(images, training=False)
    head = keras.Model(feature_map, scored.get_layer(LOGITS_LAYER).output)
    gradients = class_score_gradients(head, features, np.asarray(classes))
    weights = keras.ops.mean(gradients, axis=(1, 2), keepdims=True)
    maps = keras.ops.relu(keras.ops.sum(weights * features, axis=-1))
    peak = keras.ops.max(maps, axis=(1, 2), keepdims=True)
    return keras.ops.convert_to_numpy(maps / keras.ops.maximum(peak, 1e-12))


def grad_cam(model: keras.Model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM of ``classes[i]`` on ``images[i]``, resized to the images, each in 0..1."""
    if not len(images):
        return np.zeros(images.shape[:3], np.float32)
    maps = class_activation_maps(model, images, classes)
    resized = keras.ops.image.resize(maps[..., None], images.shape[1:3], interpolation="bilinear")
    return np.clip(keras.ops.convert_to_numpy(resized)[..., 0], 0.0, 1.0)


# --- Feature maps and filters ----------------------------------------------------------------


def _block_ends(layers: Sequence[keras.layers.Layer]) -> list[keras.layers.Layer]:
    """The last block layer (BLOCK_LAYERS) at each spatial size larger than 1x1."""
    last_at: dict[tuple[int, int], keras.layers.Layer] = {}
    for layer in layers:
        shape = layer.output.shape
        if isinstance(layer, BLOCK_LAYERS) and len(shape) == 4 and shape[1] * shape[2] > 1:
            last_at.pop((shape[1], shape[2]), None)  # re-inserted last: keeps the order
            last_at[(shape[1], shape[2])] = layer
    return list(last_at.values())


def feature_map_model(model: keras.Model) -> keras.Model:
    """A model giving the output of each convolution block, by name, for ``model``'s input.

    A nested model (a keras.applications backbone) contributes its own blocks, fed what
    the layer before it gives (as classifier/model/architectures.py builds it).
    """
    model = single_view(model)
    outputs: dict[str, keras.KerasTensor] = {}
    for index, layer in enumerate(model.layers):
        if isinstance(layer, keras.Model) and len(layer.output.shape) == 4:
            inner = _block_ends(layer.layers)
            blocks = keras.Model(layer.input, [block.output for block in inner])
            fed = blocks(model.layers[index - 1].output)
            outputs.update({f"{layer.name}/{b.name}": t for b, t in zip(inner, fed, strict=True)})
    if not outputs:
        outputs = {layer.name: layer.output for layer in _block_ends(model.layers)}
    return keras.Model(model.inputs[0], outputs)


def feature_maps(model: keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Each convolution block's output for ``images``, by layer name, in network order."""
    found = feature_map_model(model).predict(images, verbose=0)
    return {name: np.asarray(maps) for name, maps in found.items()}


def first_filters(model: keras.Model) -> tuple[str, np.ndarray]:
    """The first convolution's name and kernel, (height, width, in channels, filters)."""
    for layer in single_view(model).layers:
        if isinstance(layer, keras.Model):
            try:
                return first_filters(layer)
            except ValueError:
                continue
        if isinstance(layer, keras.layers.Conv2D):
            return layer.name, keras.ops.convert_to_numpy(layer.kernel)
    raise ValueError(f"model {model.name} has no Conv2D layer")


# --- Mosaics: the arrays the pictures draw ---------------------------------------------------


def caption_space(tile_height: int) -> int:
    """Pixels above each row of tiles for their captions."""
    return max(2, tile_height // 3)


def mosaic(tiles: np.ndarray, columns: int, gap: int = 1, top: int = 0) -> np.ndarray:
    """``tiles`` (N, height, width, channels) in rows of ``columns`` on white, ``gap``
    pixels apart, with ``top`` pixels above each row (for captions)."""
    count, height, width, channels = tiles.shape
    rows = max(1, -(-count // columns))
    canvas = np.ones((rows * (top + height), columns * (width + gap) - gap, channels), np.float32)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        first_row, first_column = row * (top + height) + top, column * (width + gap)
        canvas[first_row : first_row + height, first_column : first_column + width] = tile
    return canvas


def as_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, 1 or 3) as RGB floats in 0..1."""
    scaled = images.astype(np.float32) / 255.0
    return np.repeat(scaled, 3, axis=-1) if scaled.shape[-1] == 1 else scaled


def heat_overlay(images: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Each image (as RGB) blended with its heatmap in the jet colour map."""
    from matplotlib import colormaps

    coloured = colormaps["jet"](heat)[..., :3]
    return (1 - HEAT_ALPHA) * as_rgb(images) + HEAT_ALPHA * coloured


def normalised(maps: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``maps`` scaled to 0..1 over ``axes`` (a flat map becomes 0)."""
    low = maps.min(axis=axes, keepdims=True)
    span = maps.max(axis=axes, keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0.0)


def most_varied_channels(maps: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` channels of ``maps`` (N, H, W, C) that vary most across each map.

    A channel that is the same everywhere shows nothing; one that picks out edges or strokes
    varies most.
    """
    return np.argsort(-maps.std(axis=(1, 2)).mean(axis=0), kind="stable")[:count]


def feature_map_tiles(images: np.ndarray, maps: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """One row per image: the image, then each of ``channels``, scaled to 0..1 per tile."""
    height, width = images.shape[1:3]
    picked = normalised(maps[..., channels], axes=(1, 2))  # (N, h, w, K)
    # Every tile at the image's size (nearest: a 3x3 map stays nine squares).
    upsized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(picked, (height, width), interpolation="nearest")
    )
    gray = as_rgb(images)
    rows = []
    for image, row in zip(gray, upsized, strict=True):
        rows.append(image)
        rows.extend(np.repeat(row[..., k : k + 1], 3, axis=-1) for k in range(len(channels)))
    return np.stack(rows)


def filter_tiles(kernel: np.ndarray, count: int = FILTERS_SHOWN) -> np.ndarray:
    """The first ``count`` filters as RGB tiles: grey for one input channel (mid-grey 0),
    colour for three, the mean of the others."""
    shown = kernel[..., :count]  # (kh, kw, in, out)
    if shown.shape[2] == 3:
        tiles = normalised(np.moveaxis(shown, -1, 0), axes=(1, 2, 3))
    else:
        single = np.moveaxis(shown.mean(axis=2), -1, 0)  # (out, kh, kw)
        bound = np.abs(single).max(axis=(1, 2), keepdims=True)
        tiles = np.repeat((0.5 + 0.5 * single / np.where(bound > 0, bound, 1))[..., None], 3, -1)
    return tiles


# --- Which test images ------------------------------------------------------------------------


def confident_mistakes(probabilities: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the misclassified images the model was surest of, surest first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:count]


def confident_correct(
    probabilities: np.ndarray, labels: np.ndarray, per_class: int, classes: int
) -> np.ndarray:
    """Indices of up to ``per_class`` correctly classified images of each of the first
    ``classes`` classes, surest first."""
    predicted = probabilities.argmax(axis=1)
    chosen = []
    for label in range(min(classes, probabilities.shape[1])):
        right = np.flatnonzero((labels == label) & (predicted == label))
        chosen.extend(right[np.argsort(-probabilities[right, label], kind="stable")][:per_class])
    return np.asarray(chosen, np.int64)


def one_per_class(labels: np.ndarray, classes: int) -> np.ndarray:
    """The first image of each of the first ``classes`` classes that has one."""
    return np.asarray(
        [np.flatnonzero(labels == label)[0] for label in range(classes) if (labels == label).any()],
        np.int64,
    )


@dataclass(frozen=True)
class Panel:
    """Tiles to draw in rows of ``columns``, a caption above each ("" for none), a title."""

    tiles: np.ndarray  # (N, height, width, 3), RGB in 0..1
    columns: int
    captions: list[str]
    title: str
    inches_per_tile: float = 1.25  # on the page: small tiles are cheaper to draw and save

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.tiles.shape[1], self.tiles.shape[2]

    def canvas(self) -> np.ndarray:
        """The one image the picture draws."""
        top = caption_space(self.tile_shape[0]) if any(self.captions) else 0
        return mosaic(self.tiles, self.columns, top=top)


def gradcam_panel(
    model: keras.Model,
    test: ImageSet,
    probabilities: np.ndarray,
    indices: np.ndarray,
    title: str,
    columns: int,
) -> Panel:
    """Grad-CAM of the predicted class on each of ``test``'s ``indices``."""
    predicted = probabilities.argmax(axis=1)
    images = test.images[indices]
    heat = grad_cam(model, images, predicted[indices])
    names = test.class_names
    captions = [
        f"{names[test.labels[i]]} as {names[predicted[i]]} ({probabilities[i, predicted[i]]:.0%})"
        for i in indices
    ]
    return Panel(heat_overlay(images, heat), columns, captions, title)


def feature_map_panels(model: keras.Model, test: ImageSet) -> dict[str, Panel]:
    """Per convolution block, one row per class (its first test image): the image, then
    the channels of the block that vary most."""
    shown = one_per_class(test.labels, min(len(test.class_names), CLASSES_SHOWN))
    images = test.images[shown]
    panels = {}
    for number, (name, maps) in enumerate(feature_maps(model, images).items(), start=1):
        channels = most_varied_channels(maps, CHANNELS_SHOWN)
        captions = []
        for row, index in enumerate(shown):
            captions.append(f"class {test.class_names[test.labels[index]]}")
            captions.extend(f"ch {channel}" if row == 0 else "" for channel in channels)
        height, width, depth = maps.shape[1:]
        panels[f"feature_maps_{number}_{name.replace('/', '_')}.png"] = Panel(
            feature_map_tiles(images, maps, channels),
            len(channels) + 1,
            captions,
            f"Feature maps of {name} ({height}x{width}x{depth}): the {len(channels)} channels "
            "that vary most, one test image per class",
            inches_per_tile=FEATURE_MAP_INCHES,
        )
    return panels


def filters_panel(model: keras.Model) -> Panel:
    """The first convolution's filters."""
    layer, kernel = first_filters(model)
    height, width, inputs, count = kernel.shape
    mean = "" if inputs in (1, 3) else ", the mean over its inputs"
    shown = min(count, FILTERS_SHOWN)
    return Panel(
        filter_tiles(kernel),
        min(16, shown),
        [],
        f"First-layer filters: {layer}, {shown} of {count} at {height}x{width}x{inputs}{mean} "
        "(grey: 0, white: positive, black: negative)",
        inches_per_tile=FILTER_INCHES,
    )


def insight_panels(
    model: keras.Model, test: ImageSet, probabilities: np.ndarray
) -> dict[str, Panel]:
    """Every insight picture, by file name."""
    labels = test.labels
    mistakes = confident_mistakes(probabilities, labels, MISTAKES_SHOWN)
    correct = confident_correct(probabilities, labels, CORRECT_PER_CLASS, CLASSES_SHOWN)
    return {
        "gradcam_mistakes.png": gradcam_panel(
            model, test, probabilities, mistakes,
            "Grad-CAM: the most confidently misclassified test images (true as predicted)",
            columns=6,
        ),
        "gradcam_correct.png": gradcam_panel(
            model, test, probabilities, correct,
            "Grad-CAM: correctly classified test images, by class",
            columns=2 * CORRECT_PER_CLASS,
        ),
        **feature_map_panels(model, test),
        "filters.png": filters_panel(model),
    }  # fmt: skip


# --- The pictures ------------------------------------------------------------------------------


def panel_figure(panel: Panel):
    """A matplotlib figure of ``panel``: one image, its captions and title."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    canvas = panel.canvas()
    width = min(MAX_WIDTH_INCHES, panel.inches_per_tile * panel.columns + 0.4)
    height = (width - 2 * MARGIN_INCHES) * canvas.shape[0] / canvas.shape[1] + TITLE_INCHES
    figure, axes = plt.subplots(figsize=(width, height))
    # Fixed margins: tight_layout would draw the figure once more to measure it.
    figure.subplots_adjust(
        left=MARGIN_INCHES / width,
        right=1 - MARGIN_INCHES / width,
        bottom=MARGIN_INCHES / height,
        top=1 - (TITLE_INCHES - MARGIN_INCHES) / height,
    )
    axes.imshow(canvas, interpolation="nearest")
    axes.axis("off")
    tile_height, tile_width = panel.tile_shape
    top = caption_space(tile_height) if any(panel.captions) else 0
    for index, caption in enumerate(panel.captions):
        if caption:
            row, column = divmod(index, panel.columns)
            axes.text(
                column * (tile_width + 1) + tile_width / 2,
                row * (top + tile_height) + top - 0.5,
                caption,
                ha="center",
                va="bottom",
                fontsize=7,
            )
    if not len(panel.tiles):
        axes.text(canvas.shape[1] / 2, canvas.shape[0] / 2, "none", ha="center", va="center")
    figure.suptitle(panel.title, fontsize=10, y=1 - 0.1 / height, va="top")
    return figure


def insight_figures(model: keras.Model, test: ImageSet, probabilities: np.ndarray) -> dict:
    """Every insight picture as a figure, by its path inside the evaluate plots folder."""
    return {
        f"{INSIGHT_DIR}/{name}": panel_figure(panel)
        for name, panel in insight_panels(model, test, probabilities).items()
    }
