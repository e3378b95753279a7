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

Grad-CAM weighs a feature map fine enough to point somewhere: the last convolution block
whose map is at least ``CAM_MIN_SIZE`` pixels on each side (:func:`cam_layer`); the last
map of the reference CNN is 3x3, so it uses ``conv2`` (11x11, before the last pooling).

The pictures are mosaics: each is one image drawn once, with captions, which keeps them
cheap (a figure with a hundred small axes takes seconds to draw). A Grad-CAM picture puts
each image beside its heat map, the image's strokes drawn dark over the heat's colours,
with a colour bar.

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
FILTER_INCHES = 0.6
MAX_WIDTH_INCHES = 12.0
MARGIN_INCHES = 0.1
TITLE_INCHES = 0.4  # the title's first line
TITLE_LINE_INCHES = 0.2  # each further line
COLOUR_BAR_INCHES = 1.6
COLOUR_BAR_MAX_INCHES = 3.0
CAM_MIN_SIZE = 7  # Grad-CAM's feature map: at least this many pixels on each side, if any is
HEAT_COLOURS = "YlOrRd"  # sequential, light at 0: heat off the strokes stays visible
STROKE_SHADE = 0.85  # how dark the image's strokes are drawn over the heat's colours
FILTER_ZOOM = 8  # pixels per kernel weight in filters.png
FILTER_GAP = 4  # pixels between two filters
FILTER_BACKGROUND = (0.78, 0.85, 0.93)  # pale blue: no weight's grey looks like it
CAPTION_POINTS = 9
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


def cam_layer(model: keras.Model) -> str:
    """The name of the layer whose output Grad-CAM weighs.

    The last convolution block (see :func:`_block_ends`) whose map is at least
    ``CAM_MIN_SIZE`` on each side: the last map of a small network is often too coarse to
    point anywhere (the reference CNN's is 3x3, so this is ``conv2``, 11x11). Without one
    (a nested backbone, or small maps only), the last feature map.
    """
    last = last_feature_map(model)
    fine = [
        layer for layer in _block_ends(model.layers) if min(layer.output.shape[1:3]) >= CAM_MIN_SIZE
    ]
    for layer in reversed(fine):
        if layer.output is last:
            return layer.name
        try:  # a map that feeds the rest only through itself (no skip around it)
            keras.Model(layer.output, last)
        except ValueError:
            continue
        return layer.name
    return last._keras_history.operation.name


def feature_tensor(model: keras.Model, layer: str) -> keras.KerasTensor:
    """``layer``'s output in ``model``'s graph (a nested backbone's own output tensor is
    in its own graph: the outer one is the last feature map)."""
    last = last_feature_map(model)
    if last._keras_history.operation.name == layer:
        return last
    return model.get_layer(layer).output


def cam_layer_note(model: keras.Model) -> str:
    """Which map Grad-CAM weighs, and why, in words for a picture's title."""
    scored = single_view(model)
    name = cam_layer(scored)
    height, width = feature_tensor(scored, name).shape[1:3]
    last = last_feature_map(scored)
    if feature_tensor(scored, name) is last:
        return f"{name} ({height}x{width}), the last feature map"
    return (
        f"{name} ({height}x{width}): the last convolution block of at least "
        f"{CAM_MIN_SIZE}x{CAM_MIN_SIZE}; the last map is {last.shape[1]}x{last.shape[2]}"
    )


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


def pooling_window(model: keras.Model, layer: str) -> tuple[int, int]:
    """The window of the max pooling that takes ``layer``'s map as it is; (1, 1) if none."""
    output = feature_tensor(model, layer)
    for candidate in model.layers:
        if isinstance(candidate, keras.layers.MaxPooling2D) and candidate.input is output:
            return tuple(candidate.pool_size)
    return (1, 1)


def class_activation_maps(
    model: keras.Model, images: np.ndarray, classes: np.ndarray, layer: str | None = None
) -> np.ndarray:
    """Grad-CAM of ``classes[i]`` on ``images[i]`` at the feature map's size, each in 0..1.

    The feature map is ``layer``'s output; by default the last one (the input of the layer
    that makes it a vector). Each cell's channels are weighed by their own gradient (the
    element-wise Grad-CAM of HiResCAM, Draper and Lo 2020): a map before more layers and a
    ``Flatten`` matters by where it fires, which Grad-CAM's gradient averaged over the map
    forgets. Before a global average pooling the gradient is the same everywhere, and both
    are the class activation map. Before a max pooling, whose gradient reaches one cell of
    each window, the cells' sums are averaged over that window (one cell fewer each way).
    """
    scored = with_logits(single_view(model))
    feature_map = feature_tensor(scored, layer) if layer else last_feature_map(scored)
    features = keras.Model(scored.inputs[0], feature_map)(images, training=False)
    head = keras.Model(feature_map, scored.get_layer(LOGITS_LAYER).output)
    gradients = class_score_gradients(head, features, np.asarray(classes))
    evidence = keras.ops.sum(gradients * features, axis=-1, keepdims=True)
    window = pooling_window(scored, feature_map._keras_history.operation.name)
    if window != (1, 1):
        evidence = keras.ops.average_pool(evidence, window, strides=1, padding="valid")
    maps = keras.ops.relu(evidence[..., 0])
    peak = keras.ops.max(maps, axis=(1, 2), keepdims=True)
    return keras.ops.convert_to_numpy(maps / keras.ops.maximum(peak, 1e-12))


def cam_geometry(model: keras.Model, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Where :func:`class_activation_maps` of ``layer`` sits on the image (see
    :func:`map_geometry`): a pooling window's average is centred on the window."""
    geometry = map_geometry(model, layer)
    if geometry is None:
        return None
    offset, stride = geometry
    return offset + stride * (np.array(pooling_window(model, layer)) - 1) / 2, stride


def grad_cam(model: keras.Model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM of ``classes[i]`` on ``images[i]`` at :func:`cam_layer`, brought to the
    images' pixels (:func:`map_to_image`), each in 0..1."""
    if not len(images):
        return np.zeros(images.shape[:3], np.float32)
    model = single_view(model)
    layer = cam_layer(model)
    maps = class_activation_maps(model, images, classes, layer)
    return np.clip(map_to_image(maps, images.shape[1:3], cam_geometry(model, layer)), 0.0, 1.0)


def _window(layer: keras.layers.Layer) -> tuple[tuple[int, int], tuple[int, int], str] | None:
    """A convolution's or pooling's (window, strides, padding), dilation folded into the
    window; None for a layer that keeps every pixel where it is."""
    if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
        kernel, dilation = layer.kernel_size, layer.dilation_rate
        size = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
        return size, tuple(layer.strides), layer.padding
    if isinstance(layer, keras.layers.MaxPooling2D | keras.layers.AveragePooling2D):
        return tuple(layer.pool_size), tuple(layer.strides), layer.padding
    return None


def _first(tensors: object) -> keras.KerasTensor:
    """A layer's input, or the first of its inputs (a merge's main path)."""
    return tensors[0] if isinstance(tensors, list | tuple) else tensors


def map_geometry(model: keras.Model, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Where ``layer``'s map sits on the image: cell ``i`` of axis ``a`` is centred on pixel
    ``offset[a] + stride[a] * i``. Followed back to the input through each layer's (first)
    input; None when a layer on the way moves pixels in a way this does not know (a nested
    backbone, an upsampling): the map is then stretched over the image."""
    path = []
    tensor = feature_tensor(model, layer)
    while True:
        operation = tensor._keras_history.operation
        if isinstance(operation, keras.layers.InputLayer):
            break
        path.append(operation)
        tensor = _first(operation.input)
    offset, stride = np.zeros(2), np.ones(2)
    for operation in reversed(path):
        before, after = _first(operation.input), operation.output
        if len(before.shape) != 4 or len(after.shape) != 4:
            return None
        window = _window(operation)
        if window is None:
            if tuple(before.shape[1:3]) != tuple(after.shape[1:3]):
                return None
            continue
        size, steps, padding = window
        for axis in range(2):
            pad = 0
            if padding == "same":
                need = (after.shape[axis + 1] - 1) * steps[axis] + size[axis]
                pad = max(need - before.shape[axis + 1], 0) // 2
            offset[axis] += stride[axis] * ((size[axis] - 1) / 2 - pad)
            stride[axis] *= steps[axis]
    return offset, stride


def _interpolation(cells: int, pixels: int, offset: float, stride: float) -> np.ndarray:
    """(pixels, cells) weights of linear interpolation between cell centres, the nearest
    cell beyond the first and last."""
    position = np.clip((np.arange(pixels) - offset) / stride, 0, cells - 1)
    low = np.minimum(np.floor(position).astype(int), max(cells - 2, 0))
    weights = np.zeros((pixels, cells))
    rows = np.arange(pixels)
    if cells == 1:
        weights[:, 0] = 1.0
        return weights
    fraction = position - low
    weights[rows, low] = 1 - fraction
    weights[rows, low + 1] = fraction
    return weights


def map_to_image(
    maps: np.ndarray,
    size: tuple[int, int],
    geometry: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """``maps`` (N, h, w) at the image's ``size``, each cell's value on the pixel it is
    centred on and interpolated between; stretched over the image without ``geometry``."""
    (height, width), (cells_down, cells_across) = size, maps.shape[1:3]
    if geometry is None:  # cell centres spread evenly over the image
        offset = np.array([height / cells_down - 1, width / cells_across - 1]) / 2
        stride = np.array([height / cells_down, width / cells_across])
    else:
        offset, stride = geometry
    down = _interpolation(cells_down, height, offset[0], stride[0])
    across = _interpolation(cells_across, width, offset[1], stride[1])
    return np.einsum("yi,nij,xj->nyx", down, maps, across).astype(np.float32)


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


def tile_left(column: int, width: int, gap: int, group: int) -> int:
    """The first pixel column of tile ``column``: ``gap`` between tiles, and as much again
    between groups of ``group`` tiles (an image and its heat map)."""
    return column * (width + gap) + (column // group) * gap * (group > 1)


def tile_top(row: int, height: int, gap: int, top: int) -> int:
    """The first pixel row of row ``row`` of tiles: ``top`` pixels of captions above each,
    ``gap`` between rows."""
    return row * (top + height + gap) + top


def mosaic(
    tiles: np.ndarray,
    columns: int,
    gap: int = 1,
    top: int = 0,
    group: int = 1,
    background: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """``tiles`` (N, height, width, 3) in rows of ``columns`` on ``background``, ``gap``
    pixels apart (twice that between groups of ``group``), ``top`` pixels above each row
    (for captions)."""
    count, height, width, channels = tiles.shape
    rows = max(1, -(-count // columns))
    bottom = tile_top(rows - 1, height, gap, top) + height
    right = tile_left(columns - 1, width, gap, group) + width
    canvas = np.empty((bottom, right, channels), np.float32)
    canvas[...] = np.asarray(background, np.float32)[:channels]
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        first_row = tile_top(row, height, gap, top)
        first_column = tile_left(column, width, gap, group)
        canvas[first_row : first_row + height, first_column : first_column + width] = tile
    return canvas


def as_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, 1 or 3) as RGB floats in 0..1."""
    scaled = images.astype(np.float32) / 255.0
    return np.repeat(scaled, 3, axis=-1) if scaled.shape[-1] == 1 else scaled


def strokes(images: np.ndarray) -> np.ndarray:
    """How far each pixel is from its image's background (the median brightness of its
    border), 0..1: the strokes of a digit, light on dark or dark on light."""
    grey = as_rgb(images).mean(axis=-1)
    border = np.concatenate([grey[:, 0], grey[:, -1], grey[:, 1:-1, 0], grey[:, 1:-1, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None]
    return normalised(np.abs(grey - background), axes=(1, 2))


def heat_overlay(images: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Each heat map in ``HEAT_COLOURS``, its image's strokes drawn dark over it: the
    digit stays readable, and so does heat off the strokes."""
    from matplotlib import colormaps

    coloured = colormaps[HEAT_COLOURS](heat)[..., :3]
    return coloured * (1 - STROKE_SHADE * strokes(images))[..., None]


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


def zoomed(tiles: np.ndarray, factor: int) -> np.ndarray:
    """Each tile ``factor`` times larger, every pixel a square (for gaps narrower than one)."""
    return np.repeat(np.repeat(tiles, factor, axis=1), factor, axis=2)


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
class ColourBar:
    """The scale beside a picture: a matplotlib colour map over 0..1, labelled."""

    colours: str
    label: str
    ticks: tuple[float, ...] = (0.0, 0.5, 1.0)
    tick_labels: tuple[str, ...] = ("0", "0.5", "1")


@dataclass(frozen=True)
class Panel:
    """Tiles to draw in rows of ``columns``, a caption above each group of ``group`` tiles
    ("" for none), a title (lines apart by "\n"), and the colour bar of the tiles' scale."""

    tiles: np.ndarray  # (N, height, width, 3), RGB in 0..1
    columns: int
    captions: list[str]  # one per group of ``group`` tiles
    title: str
    inches_per_tile: float = 1.25  # on the page: small tiles are cheaper to draw and save
    group: int = 1
    gap: int = 1
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    colour_bar: ColourBar | None = None

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.tiles.shape[1], self.tiles.shape[2]

    @property
    def top(self) -> int:
        return caption_space(self.tile_shape[0]) if any(self.captions) else 0

    def canvas(self) -> np.ndarray:
        """The one image the picture draws."""
        return mosaic(self.tiles, self.columns, self.gap, self.top, self.group, self.background)


HEAT_BAR = ColourBar(
    HEAT_COLOURS,
    "Grad-CAM heat: evidence for the predicted class",
    tick_labels=("0 (none)", "0.5", "1 (the most)"),
)


def gradcam_panel(
    model: keras.Model,
    test: ImageSet,
    probabilities: np.ndarray,
    indices: np.ndarray,
    title: str,
    columns: int,
) -> Panel:
    """Each of ``test``'s ``indices`` beside the Grad-CAM of its predicted class (its
    strokes drawn over it), ``columns`` pairs a row."""
    predicted = probabilities.argmax(axis=1)
    images = test.images[indices]
    heat = grad_cam(model, images, predicted[indices])
    names = test.class_names
    captions = [
        f"true {names[test.labels[i]]}, predicted {names[predicted[i]]} "
        f"({probabilities[i, predicted[i]]:.0%})"
        for i in indices
    ]
    pairs = np.stack([as_rgb(images), heat_overlay(images, heat)], axis=1)
    layer = cam_layer_note(model)
    return Panel(
        pairs.reshape(-1, *pairs.shape[2:]),
        2 * columns,
        captions,
        f"{title}\nBeside each image: where the evidence for its predicted class lies, by "
        f"Grad-CAM (cell by cell) of\n{layer}.\nHeat off the strokes is evidence too: "
        "strokes missing there (a digit's empty middle says 0, not 8).",
        inches_per_tile=1.0,
        group=2,
        colour_bar=HEAT_BAR,
    )


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
    """The first convolution's filters, apart on a pale background."""
    layer, kernel = first_filters(model)
    height, width, inputs, count = kernel.shape
    mean = "" if inputs in (1, 3) else ", the mean over its inputs"
    shown = min(count, FILTERS_SHOWN)
    grey = inputs != 3
    return Panel(
        zoomed(filter_tiles(kernel), FILTER_ZOOM),
        min(shown, max(8, shown // 4)),
        [],
        f"First-layer filters: {layer}, {shown} of {count} at {height}x{width}x{inputs}{mean}"
        + ("\nEach filter scaled to its own largest weight" if grey else ""),
        inches_per_tile=FILTER_INCHES,
        gap=FILTER_GAP,
        background=FILTER_BACKGROUND,
        colour_bar=ColourBar(
            "gray", "weight", tick_labels=("negative", "0", "positive")
        ) if grey else None,
    )  # fmt: skip


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
            "Grad-CAM: the test images the model got wrong most confidently",
            columns=4,
        ),
        "gradcam_correct.png": gradcam_panel(
            model, test, probabilities, correct,
            "Grad-CAM: correctly classified test images, by class",
            columns=CORRECT_PER_CLASS,
        ),
        **feature_map_panels(model, test),
        "filters.png": filters_panel(model),
    }  # fmt: skip


# --- The pictures ------------------------------------------------------------------------------


def panel_figure(panel: Panel):
    """A matplotlib figure of ``panel``: one image, its captions, title and colour bar."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable

    canvas = panel.canvas()
    scale = panel.colour_bar if len(panel.tiles) else None
    bar = COLOUR_BAR_INCHES if scale else 0.0
    image_width = min(MAX_WIDTH_INCHES - bar, panel.inches_per_tile * panel.columns)
    width = image_width + 2 * MARGIN_INCHES + bar
    title = TITLE_INCHES + TITLE_LINE_INCHES * panel.title.count("\n")
    image_height = image_width * canvas.shape[0] / canvas.shape[1]
    height = image_height + 2 * MARGIN_INCHES + title
    figure = plt.figure(figsize=(width, height))
    # Fixed places: tight_layout would draw the figure once more to measure it.
    axes = figure.add_axes(
        (MARGIN_INCHES / width, MARGIN_INCHES / height, image_width / width, image_height / height)
    )
    axes.imshow(canvas, interpolation="nearest")
    axes.axis("off")
    tile_height, tile_width = panel.tile_shape
    group_columns = max(1, panel.columns // panel.group)
    for index, caption in enumerate(panel.captions):
        if caption:
            row, column = divmod(index, group_columns)
            first = tile_left(column * panel.group, tile_width, panel.gap, panel.group)
            last = tile_left((column + 1) * panel.group - 1, tile_width, panel.gap, panel.group)
            axes.text(
                (first + last + tile_width) / 2 - 0.5,
                tile_top(row, tile_height, panel.gap, panel.top) - 1,
                caption,
                ha="center",
                va="bottom",
                fontsize=CAPTION_POINTS,
            )
    if not len(panel.tiles):
        axes.text(canvas.shape[1] / 2, canvas.shape[0] / 2, "none", ha="center", va="center")
    if scale:
        bar_height = min(0.8 * image_height, COLOUR_BAR_MAX_INCHES)
        bar_axes = figure.add_axes(
            (
                (width - bar + 0.1) / width,
                (MARGIN_INCHES + (image_height - bar_height) / 2) / height,
                0.15 / width,
                bar_height / height,
            )
        )
        colour_bar = figure.colorbar(
            ScalarMappable(cmap=colormaps[scale.colours]), cax=bar_axes, ticks=scale.ticks
        )
        colour_bar.ax.set_yticklabels(scale.tick_labels, fontsize=CAPTION_POINTS)
        colour_bar.set_label(scale.label, fontsize=CAPTION_POINTS)
    figure.text(0.5, 1 - MARGIN_INCHES / height, panel.title, ha="center", va="top", fontsize=10)
    return figure


def insight_figures(model: keras.Model, test: ImageSet, probabilities: np.ndarray) -> dict:
    """Every insight picture as a figure, by its path inside the evaluate plots folder."""
    return {
        f"{INSIGHT_DIR}/{name}": panel_figure(panel)
        for name, panel in insight_panels(model, test, probabilities).items()
    }
