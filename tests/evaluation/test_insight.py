"""What the network looks at: Grad-CAM, feature maps and filters, checked against their
definitions, on real Keras models (classifier/evaluation/insight.py)."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest
from PIL import Image
from scipy.signal import correlate2d

from classifier.config import EvaluateParams
from classifier.data.dataset import ImageSet, read_image_set
from classifier.evaluation import insight
from classifier.model.architectures import build_model
from classifier.model.files import load_model
from classifier.model.temperature import with_temperature
from stages import evaluate

SIZE = 28
CORNER = 9  # the top-left CORNER x CORNER pixels decide the class
SOBEL = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def corner_images(count: int, seed: int) -> ImageSet:
    """Class 1 has a bright square in the top-left corner, class 0 not; both have a bright
    square of the same size somewhere else, so only the corner tells them apart."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (count, SIZE, SIZE, 1)).astype(np.uint8)
    labels = np.arange(count) % 2
    for index in range(count):
        row, column = rng.integers(CORNER + 1, SIZE - 6, 2)
        images[index, row : row + 6, column : column + 6] = 230
        if labels[index]:
            top, left = rng.integers(1, CORNER - 6, 2)
            images[index, top : top + 6, left : left + 6] = 230
    return ImageSet(images, labels.astype(np.int64), ("plain", "corner"))


@pytest.mark.slow
def test_grad_cam_lights_up_the_corner_a_model_was_trained_to_look_at():
    # The reference CNN's last map is 3x3; Grad-CAM weighs conv2's, 11x11, cell by cell,
    # which tells the corner from the same square elsewhere. (Grad-CAM's map-wide average
    # of the gradient did not: 25 % of its maps were empty, and the other square as hot.)
    # The other architectures' maps are checked against the definition below, untrained.
    keras.utils.set_random_seed(0)
    train, test = corner_images(600, seed=1), corner_images(40, seed=2)
    model = build_model("reference_cnn", (SIZE, SIZE, 1), 2)
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy")
    model.fit(train.images, train.labels, epochs=6, batch_size=32, verbose=0)
    probabilities = model.predict(test.images, verbose=0)
    assert np.mean(probabilities.argmax(1) == test.labels) >= 0.95  # it learnt the corner

    corner = test.images[test.labels == 1]
    heat = insight.grad_cam(model, corner, np.ones(len(corner), np.int64))
    assert heat.shape == corner.shape[:3] and heat.min() >= 0 and heat.max() <= 1
    half = SIZE // 2
    top_left = heat[:, :half, :half].mean(axis=(1, 2))
    elsewhere = (heat.sum(axis=(1, 2)) - heat[:, :half, :half].sum(axis=(1, 2))) / (
        SIZE * SIZE - half * half
    )
    assert np.mean(top_left > 2 * elsewhere) >= 0.9
    hottest = [np.unravel_index(np.argmax(one), one.shape) for one in heat]
    assert np.mean([row < half and column < half for row, column in hottest]) >= 0.9


def ink_or_paper_model(size: int = 8) -> keras.Model:
    """A hand-built classifier whose Grad-CAM is known exactly: a 1x1 convolution gives
    two maps, ``ink`` (the pixel, 0..1) and ``paper`` (1 - the pixel); their averages are
    the logits of class 0 and class 1. Grad-CAM weighs a class's own map by 1 / pixels and
    the other's by 0, so class 0's heat is the ink and class 1's is the paper, each scaled
    to a peak of 1."""
    inputs = keras.Input((size, size, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    maps = keras.layers.Conv2D(2, 1, activation="relu", name="ink_paper")
    x = maps(x)
    maps.set_weights([np.array([1.0, -1.0]).reshape(1, 1, 1, 2), np.array([0.0, 1.0])])
    x = keras.layers.GlobalAveragePooling2D(name="average")(x)
    head = keras.layers.Dense(2, activation="softmax", name="probabilities")
    outputs = head(x)
    head.set_weights([np.eye(2), np.zeros(2)])
    return keras.Model(inputs, outputs)


def stroke_images() -> np.ndarray:
    """Two 8x8 images: a vertical stroke and a horizontal one, of uneven brightness."""
    images = np.zeros((2, 8, 8, 1), np.uint8)
    images[0, 1:7, 3, 0] = np.linspace(100, 250, 6)
    images[1, 5, 1:7, 0] = np.linspace(250, 100, 6)
    return images


def test_grad_cam_of_a_hand_built_model_is_its_own_class_evidence():
    # Fails if grad_cam returned zeros, a constant, or another class's gradient.
    model, images = ink_or_paper_model(), stroke_images()
    ink = images[..., 0] / 255.0
    paper = 1 - ink
    heat = insight.grad_cam(model, np.concatenate([images, images]), np.array([0, 0, 1, 1]))
    expected = np.concatenate([ink, paper]) / np.concatenate([ink, paper]).max(
        axis=(1, 2), keepdims=True
    )
    np.testing.assert_allclose(heat, expected, atol=1e-5)


def test_the_overlay_colours_the_heat_and_darkens_the_strokes():
    from matplotlib import colormaps

    model, images = ink_or_paper_model(), stroke_images()
    test = ImageSet(images, np.array([1, 1]), ("ink", "paper"))
    probabilities = np.array([[0.2, 0.8], [0.4, 0.6]])  # both read as "paper"
    panel = insight.gradcam_panel(model, test, probabilities, np.array([0, 1]), "t", columns=2)
    # Image, then its heat map; a caption per pair, naming both classes and the confidence.
    assert panel.captions == [
        "true paper, predicted paper (80%)",
        "true paper, predicted paper (60%)",
    ]
    np.testing.assert_allclose(panel.tiles[0::2], insight.as_rgb(images))
    overlay = panel.tiles[1::2]
    # Off the stroke, the heat of "paper" is 1 (its most), drawn in the colour bar's top colour.
    top = colormaps[insight.HEAT_COLOURS](1.0)[:3]
    np.testing.assert_allclose(overlay[0, 0, 0], top, atol=1e-6)
    np.testing.assert_allclose(overlay[1, 7, 7], top, atol=1e-6)
    # On the brightest stroke pixel, the heat is lowest and the stroke darkens its colour.
    low = colormaps[insight.HEAT_COLOURS](0.0)[:3]
    np.testing.assert_allclose(
        overlay[0, 6, 3], np.multiply(low, 1 - insight.STROKE_SHADE), atol=0.01
    )
    assert "ink_paper (8x8), the last feature map" in panel.title.replace("\n", " ")


def test_grad_cam_weighs_a_map_fine_enough_to_point_somewhere():
    # The reference CNN's last map (conv3) is 3x3: Grad-CAM uses conv2, 11x11, before the
    # last pooling. Its cell i sits on pixel 3.5 + 2 i: conv1 (3x3, valid) centres a cell
    # 1 pixel in, pool1 doubles the step (0.5 more), conv2 (3x3, valid) one step of 2 more.
    reference = build_model("reference_cnn", (SIZE, SIZE, 1), 10)
    assert insight.cam_layer(reference) == "conv2"
    offset, stride = insight.map_geometry(reference, "conv2")
    np.testing.assert_allclose(offset, [3.5, 3.5])
    np.testing.assert_allclose(stride, [2, 2])
    # One hot cell lands on its pixel; pixels between cells are interpolated.
    cells = np.zeros((1, 11, 11))
    cells[0, 2, 5] = 1.0
    heat = insight.map_to_image(cells, (SIZE, SIZE), (offset, stride))
    # The cell sits at pixel (3.5 + 2 * 2, 3.5 + 2 * 5) = (7.5, 13.5): the four pixels
    # around it, half a pixel (a quarter of a step) away, get 0.75 * 0.75 of it.
    np.testing.assert_allclose(heat[0, 7:9, 13:15], 0.5625)
    assert heat[0].sum() == pytest.approx(heat[0, 4:12, 10:18].sum())  # nothing beyond a step
    # The gradient through pool2 reaches one cell of each 2x2 window, so Grad-CAM averages
    # each window: 10x10 cells, centred half a cell (one pixel) further on.
    assert insight.pooling_window(reference, "conv2") == (2, 2)
    offset, stride = insight.cam_geometry(reference, "conv2")
    np.testing.assert_allclose(offset, [4.5, 4.5])
    images = np.zeros((1, SIZE, SIZE, 1), np.uint8)
    assert insight.class_activation_maps(reference, images, [0], "conv2").shape == (1, 10, 10)
    # small_bn_cnn's last map is 7x7 already: that one.
    small = build_model("small_bn_cnn", (SIZE, SIZE, 1), 10)
    assert (
        insight.cam_layer(small) == small.get_layer("average").input._keras_history.operation.name
    )


def cam_by_definition(model: keras.Model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """For a global-average-pooling head, Grad-CAM is the class activation map (Zhou et al.):
    the last feature map weighted by the Dense layer's column of the class, through a ReLU."""
    features = keras.Model(model.inputs, model.get_layer("average").input).predict(
        images, verbose=0
    )
    kernel = keras.ops.convert_to_numpy(model.get_layer("probabilities").kernel)
    maps = np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]), 0)
    return maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)


@pytest.mark.parametrize(
    ("architecture", "shape"),
    [
        ("small_bn_cnn", (28, 28, 1)),
        ("photo_resnet", (32, 32, 3)),
        pytest.param("mobilenet_v3_small", (96, 96, 1), marks=pytest.mark.slow),
    ],
)
def test_grad_cam_is_the_class_activation_map_for_flat_and_nested_models(architecture, shape):
    keras.utils.set_random_seed(3)
    model = build_model(architecture, shape, 3)
    images = np.random.default_rng(4).integers(0, 256, (4, *shape)).astype(np.uint8)
    classes = np.array([0, 1, 2, 1])
    expected = cam_by_definition(model, images, classes)
    assert expected.shape[1] > 1  # a map, not one number
    found = insight.class_activation_maps(model, images, classes)
    np.testing.assert_allclose(found, expected, atol=1e-4)
    # A temperature divides every logit alike: the same maps for the calibrated model.
    calibrated = insight.class_activation_maps(with_temperature(model, 2.5), images, classes)
    np.testing.assert_allclose(calibrated, expected, atol=1e-4)
    # The pictures' Grad-CAM (at cam_layer, on the pixels): one map per image, its peak
    # 1 (a little less where the peak cell's centre falls between pixels).
    heat = insight.grad_cam(model, images, classes)
    assert heat.shape == images.shape[:3] and np.all(heat.max(axis=(1, 2)) > 0.9)


def test_feature_map_of_a_known_filter_equals_the_convolution_by_hand():
    model = build_model("reference_cnn", (SIZE, SIZE, 1), 10)
    conv = model.get_layer("conv1")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in conv.weights)
    kernel[:, :, 0, 0], bias[0] = SOBEL, 0.1
    conv.set_weights([kernel, bias])
    image = np.random.default_rng(5).integers(0, 256, (1, SIZE, SIZE, 1)).astype(np.uint8)

    maps = insight.feature_maps(model, image)
    assert list(maps) == ["conv1", "conv2", "conv3"]  # every convolution block, in order
    by_hand = np.maximum(correlate2d(image[0, :, :, 0] / 255.0, SOBEL, mode="valid") + 0.1, 0)
    np.testing.assert_allclose(maps["conv1"][0, :, :, 0], by_hand, atol=1e-5)

    # The picture's tile of that channel: the map scaled to 0..1, at the image's size.
    tiles = insight.feature_map_tiles(image, maps["conv1"], np.array([0]))
    assert tiles.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(tiles[0, :, :, 0], image[0, :, :, 0] / 255.0)
    resized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(insight.normalised(by_hand, (0, 1))[None, ..., None], (SIZE, SIZE),
                               interpolation="nearest")
    )[0, :, :, 0]  # fmt: skip
    np.testing.assert_allclose(tiles[1, :, :, 0], resized, atol=1e-5)

    # The first layer's filters: the Sobel kernel, 0 as mid-grey, its sign as light or dark.
    layer, first = insight.first_filters(model)
    assert layer == "conv1"
    tile = insight.filter_tiles(first)[0, :, :, 0]
    np.testing.assert_allclose(tile, 0.5 + 0.5 * SOBEL / 2)


@pytest.mark.slow
def test_feature_maps_of_a_nested_backbone_are_its_own_blocks():
    keras.utils.set_random_seed(6)
    model = build_model("mobilenet_v3_small", (64, 64, 1), 3)
    images = np.random.default_rng(7).integers(0, 256, (2, 64, 64, 1)).astype(np.uint8)
    maps = insight.feature_maps(model, images)
    assert all(name.startswith("backbone/") for name in maps)
    sizes = [found.shape[1] for found in maps.values()]
    assert sizes == sorted(set(sizes), reverse=True) and len(sizes) >= 3  # one per resolution
    # The same as the backbone alone, fed the grey image as three channels.
    backbone = model.get_layer("backbone")
    name, found = next(iter(maps.items()))
    inner = keras.Model(backbone.input, backbone.get_layer(name.split("/")[1]).output)
    rgb = np.repeat(images.astype(np.float32), 3, axis=-1)
    np.testing.assert_allclose(found, inner.predict(rgb, verbose=0), atol=1e-4)
    assert insight.first_filters(model)[1].shape[:3] == (3, 3, 3)


def test_the_mistakes_shown_are_the_surest_wrong_answers():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7], [0.95, 0.05]])
    labels = np.array([1, 1, 0, 0, 0])
    assert insight.confident_mistakes(probabilities, labels, 2).tolist() == [0, 3]
    assert insight.confident_correct(probabilities, labels, 1, 2).tolist() == [4, 1]


@pytest.mark.slow
def test_evaluate_writes_and_logs_the_insight_pictures(trained, trained_store, tmp_path):
    plots_dir = tmp_path / "plots"
    evaluate.run(
        EvaluateParams(batch_size=64),
        data_dir=trained.data_dir,
        model_path=trained.model_path,
        run_info_path=trained.run_info_path,
        history_path=trained.history_path,
        metrics_path=tmp_path / "evaluate.json",
        plots_dir=plots_dir,
    )
    written = {path.name for path in (plots_dir / insight.INSIGHT_DIR).iterdir()}
    assert written == {
        "gradcam_mistakes.png",
        "gradcam_correct.png",
        "feature_maps_1_conv1.png",
        "feature_maps_2_conv2.png",
        "feature_maps_3_conv3.png",
        "filters.png",
    }
    for name in written:
        with Image.open(plots_dir / insight.INSIGHT_DIR / name) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 100
    # The correct Grad-CAMs: each test image, then its heat map, at conv2 (not the 3x3 conv3).
    test = read_image_set(trained.data_dir / "test")
    model = load_model(str(trained.model_path))
    probabilities = model.predict(test.images, verbose=0)
    panels = insight.insight_panels(model, test, probabilities)
    correct = insight.confident_correct(probabilities, test.labels, 3, 10)
    shown = panels["gradcam_correct.png"]
    np.testing.assert_allclose(shown.tiles[0::2], insight.as_rgb(test.images[correct]))
    assert len(shown.captions) == len(correct) and "conv2 (11x11)" in shown.title
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    logged = client.list_artifacts(trained.result.run_id, f"evaluation/{insight.INSIGHT_DIR}")
    assert {artifact.path.split("/")[-1] for artifact in logged} == written
