"""Stage ``download``: fetch the raw images named by ``data.source`` into ``data/raw``.

Output: an image set (see stages/dataset.py) at the images' native size.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stages.atomic import atomic_path
from stages.cli import run_stage
from stages.config import DEFAULT_PARAMS_PATH, DataParams, load_params
from stages.dataset import ImageSet, write_image_set

log = logging.getLogger(__name__)

# scikit-learn's digits are 8x8 with intensities 0..16; scale them to the usual 0..255.
DIGITS_MAX_INTENSITY = 16


def fetch_digits() -> ImageSet:
    """The 1,797 real handwritten digits shipped inside scikit-learn (no network)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / DIGITS_MAX_INTENSITY)).astype(np.uint8)
    return ImageSet(
        images=pixels[..., np.newaxis],
        labels=digits.target.astype(np.int64),
        class_names=tuple(str(digit) for digit in range(10)),
    )


SOURCES: dict[str, Callable[[], ImageSet]] = {"digits": fetch_digits}


def run(cfg: DataParams, out_dir: Path) -> ImageSet:
    """Fetch the configured source and write it to ``out_dir`` atomically."""
    image_set = SOURCES[cfg.source]()
    with atomic_path(out_dir, directory=True) as tmp:
        write_image_set(tmp, image_set)
    log.info(
        "wrote %d images of %s in %d classes to %s",
        len(image_set.images),
        "x".join(map(str, image_set.image_shape)),
        len(image_set.class_names),
        out_dir,
    )
    return image_set


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stages.download",
        description="Fetch the raw images chosen by data.source in params.yaml.",
    )
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH, help="params file")
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage("download", lambda: run(load_params(args.params).data, args.out))


if __name__ == "__main__":
    raise SystemExit(main())
