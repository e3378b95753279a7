import numpy as np
import pytest

from classifier.data.duplicates import (
    find_duplicates,
    group_pairs,
    member_table,
    near_pairs,
    perceptual_hashes,
)
from classifier.data.images import load_image
from classifier.errors import DataError
from tests.helpers import photo_crops, save_resized_jpeg

SIZE = (48, 48, 3)


def prepared(path):
    return load_image(path, *SIZE, "pad")[0]


def with_flipped_bits(hashes, bits, rng):
    """Each hash with ``bits`` of its 64 bits flipped, chosen at random."""
    flipped = hashes.copy()
    for index in range(len(hashes)):
        for bit in rng.choice(64, bits, replace=False):
            flipped[index] ^= np.uint64(1) << np.uint64(bit)
    return flipped


def brute_force_pairs(hashes, distance):
    apart = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    first, second = np.nonzero(np.triu(apart <= distance, k=1))
    return set(zip(first.tolist(), second.tolist(), strict=True))


def test_a_resized_jpeg_copy_of_a_photo_is_grouped_with_it_and_other_photos_are_not(tmp_path):
    from PIL import Image

    china, flower = photo_crops()[7], photo_crops()[22]
    Image.fromarray(china).save(tmp_path / "china.png")
    Image.fromarray(flower).save(tmp_path / "flower.png")
    save_resized_jpeg(tmp_path / "china.png", tmp_path / "china_small.jpg", scale=0.6, quality=75)
    save_resized_jpeg(tmp_path / "china.png", tmp_path / "china_big.jpg", scale=2, quality=90)
    names = ["china.png", "flower.png", "china_small.jpg", "china_big.jpg", "china.png"]
    images = np.stack([prepared(tmp_path / name) for name in names])

    groups = find_duplicates(images, distance=4)

    assert groups.group.tolist() == [0, 1, 0, 0, 0]
    assert groups.exact.tolist() == [0, 1, 2, 3, 0]  # only the same file twice is identical
    table = member_table(groups, name=names)
    assert table["name"].tolist() == ["china.png", "china_small.jpg", "china_big.jpg", "china.png"]
    assert table["kind"].tolist() == ["exact", "near", "near", "exact"]


def test_distinct_photos_are_never_near_duplicates_even_at_distance_8():
    images = np.stack(photo_crops())
    assert (find_duplicates(images, distance=8).group == np.arange(len(images))).all()


@pytest.mark.parametrize("distance", [0, 1, 2, 4, 7])
def test_near_pairs_are_exactly_the_pairs_within_the_distance(distance):
    rng = np.random.default_rng(distance)
    bases = rng.integers(0, 2**64, 300, dtype=np.uint64)
    # Neighbours from 0 to 10 bits away from their base: some inside the distance, some not.
    hashes = np.concatenate([bases, *(with_flipped_bits(bases, k, rng) for k in range(11))])

    first, second = near_pairs(hashes, distance)

    found = {(min(a, b), max(a, b)) for a, b in zip(first.tolist(), second.tolist(), strict=True)}
    expected = brute_force_pairs(hashes, distance)
    assert len(expected) >= len(bases)  # the test would be empty otherwise
    assert found == expected


def test_a_copy_of_a_copy_joins_the_group_of_the_original():
    rng = np.random.default_rng(3)
    original = rng.integers(0, 2**64, 1, dtype=np.uint64)
    copy = with_flipped_bits(original, 4, rng)
    copy_of_copy = with_flipped_bits(copy, 4, rng)
    hashes = np.concatenate([original, copy, copy_of_copy, rng.integers(0, 2**64, 2, np.uint64)])
    assert np.bitwise_count(original ^ copy_of_copy)[0] > 4

    groups = group_pairs(len(hashes), *near_pairs(hashes, 4))

    assert groups.tolist() == [0, 0, 0, 3, 4]


def test_grouping_60000_random_hashes_at_distance_4_runs_and_finds_the_planted_copies():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64, 60_000, dtype=np.uint64)
    hashes[-100:] = with_flipped_bits(hashes[:100], 4, rng)

    first, second = near_pairs(hashes, 4)
    groups = group_pairs(len(hashes), first, second)

    assert (np.bitwise_count(hashes[first] ^ hashes[second]) <= 4).all()
    assert (groups[-100:] == np.arange(100)).all()
    # Random 64-bit hashes are almost never within 4 bits of each other by chance.
    assert len(np.unique(groups)) >= 60_000 - 100 - 5


def test_thousands_of_blank_images_form_one_exact_group():
    photos = np.stack([photo[::4, ::4] for photo in photo_crops()[:10]])  # 32x32 photos
    images = np.concatenate([np.zeros((5_000, 32, 32, 3), np.uint8), photos])

    groups = find_duplicates(images, distance=4)

    assert (groups.group[:5_000] == 0).all()
    assert (groups.group[5_000:] == np.arange(5_000, 5_010)).all()
    assert member_table(groups)["kind"].eq("exact").all()


def test_a_search_that_would_take_minutes_is_refused_naming_the_param():
    hashes = np.random.default_rng(0).integers(0, 2**64, 60_000, dtype=np.uint64)
    with pytest.raises(DataError, match=r"within 32 bits would compare .* lower preprocess\."):
        near_pairs(hashes, 32)


def test_perceptual_hashes_are_imagehash_phash_as_64_bit_integers():
    import imagehash
    from PIL import Image

    rgb = np.stack([photo[::4, ::4] for photo in photo_crops()[:3]])
    gray = rgb[..., 1:2]
    for images, pictures in (
        (rgb, [Image.fromarray(image, "RGB") for image in rgb]),
        (gray, [Image.fromarray(image[..., 0], "L") for image in gray]),
    ):
        expected = [str(imagehash.phash(picture)) for picture in pictures]
        assert [f"{int(value):016x}" for value in perceptual_hashes(images)] == expected
