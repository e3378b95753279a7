import numpy as np
import pytest
from PIL import Image

from classifier.data.images import UnreadableImage, load_image, to_array


def save(tmp_path, name, picture, **options):
    path = tmp_path / name
    picture.save(path, **options)
    return path


def test_grayscale_png_loads_at_the_target_size(tmp_path):
    path = save(tmp_path, "g.png", Image.new("L", (40, 30), 200))
    pixels, source = load_image(path, 28, 28, 1, "stretch")
    assert pixels.shape == (28, 28, 1) and pixels.dtype == np.uint8
    assert (pixels == 200).all()
    assert source == {"format": "PNG", "mode": "L", "width": 40, "height": 30}


def test_rgb_jpeg_converts_to_grayscale_by_luminance(tmp_path):
    path = save(tmp_path, "red.jpg", Image.new("RGB", (64, 64), (255, 0, 0)), quality=100)
    pixels, _ = load_image(path, 16, 16, 1, "stretch")
    # ITU-R 601 luma of pure red is 0.299 * 255 = 76.
    assert abs(int(pixels.mean()) - 76) <= 2


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
    path = save(tmp_path, "deep.png", Image.fromarray(ramp))
    pixels, source = load_image(path, 16, 16, 1, "stretch")
    assert source["mode"].startswith("I")
    np.testing.assert_array_equal(pixels[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))


def test_transparent_pixels_become_white_and_palette_images_load(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    pixels, _ = load_image(save(tmp_path, "a.png", rgba), 8, 8, 3, "stretch")
    assert tuple(pixels[0, 0]) == (0, 0, 0)
    assert tuple(pixels[7, 7]) == (255, 255, 255)
    palette = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    pixels, source = load_image(save(tmp_path, "p.gif", palette), 8, 8, 3, "stretch")
    assert source["mode"] == "P" and tuple(pixels[4, 4]) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("L", (40, 20), 0)
    wide.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(tmp_path, "phone.jpg", wide, exif=exif, quality=100)
    pixels, _ = load_image(path, 40, 20, 1, "stretch")
    # Displayed upright, the photo is 20 wide and 40 tall with the white half on top.
    assert pixels[:18].mean() > 200 and pixels[22:].mean() < 50


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"just some text", "not an image")],
)
def test_files_that_are_not_images_are_refused_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match=reason):
        load_image(path, 28, 28, 1, "stretch")


def test_truncated_jpeg_is_refused(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = save(tmp_path, "cut.jpg", Image.fromarray(noise))
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(UnreadableImage, match="corrupt or truncated"):
        load_image(path, 28, 28, 1, "stretch")


def test_unsupported_formats_are_refused(tmp_path):
    path = save(tmp_path, "scan.tiff", Image.new("L", (8, 8)))
    with pytest.raises(UnreadableImage, match="unsupported image format TIFF"):
        load_image(path, 8, 8, 1, "stretch")


def bar_picture():
    """A 40x20 white picture with a black border column at each side."""
    picture = Image.new("L", (40, 20), 255)
    picture.paste(0, (0, 0, 2, 20))
    picture.paste(0, (38, 0, 40, 20))
    return picture


def test_resize_policies_differ_as_named():
    stretched = to_array(bar_picture(), 20, 20, 1, "stretch")[..., 0]
    cropped = to_array(bar_picture(), 20, 20, 1, "crop")[..., 0]
    padded = to_array(bar_picture(), 20, 20, 1, "pad")[..., 0]
    assert stretched[:, 0].max() < 128  # the border squeezed in, still at the edge
    assert cropped.min() == 255  # the centre crop drops both borders
    assert padded[0].max() == 0 and padded[10, 5] == 255  # black bands above and below
