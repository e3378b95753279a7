"""The data sources: bring the raw images named by ``data.source`` into one folder.

The folder (``data/raw`` in the pipeline) is laid out as classifier/data/raw.py says.
Image files are decoded by preprocess, which knows the target size; nothing here holds
more than one IDX file or one image file in memory at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier.atomic import atomic_path, write_json
from classifier.config import DataParams
from classifier.data.dataset import ImageSet, write_image_set
from classifier.data.folders import ClassFolders, list_class_folders
from classifier.data.raw import (
    FILES_DIR,
    FILES_LAYOUT,
    POOL_DIR,
    POOL_LAYOUT,
    SOURCE_FILE,
    SPLIT_FILES_LAYOUT,
    SPLIT_LAYOUT,
)
from classifier.errors import DataError

log = logging.getLogger(__name__)

# scikit-learn's digits are 8x8 with intensities 0..16; scale them to the usual 0..255.
DIGITS_MAX_INTENSITY = 16
DIGIT_NAMES = tuple(str(digit) for digit in range(10))

# The four IDX files of MNIST-like datasets, by their role.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_MAX_BYTES = 64 * 2**20  # the largest file, train images, is about 26 MiB gzipped
ARCHIVE_MAX_BYTES = 20 * 2**30


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-like dataset published as four IDX files on public mirrors."""

    mirrors: tuple[str, ...]
    sha256: dict[str, str]  # by role, as in IDX_FILES; the published sums of the .gz files
    class_names: tuple[str, ...]


IDX_DATASETS = {
    "mnist": IdxDataset(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        sha256={
            "train_images": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train_labels": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "test_images": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "test_labels": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        class_names=DIGIT_NAMES,
    ),
    "fashion_mnist": IdxDataset(
        mirrors=(
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            "https://fashion-mnist.s3.eu-central-1.amazonaws.com/",
        ),
        sha256={
            "train_images": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train_labels": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "test_images": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "test_labels": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
}


def fetch_digits(cfg: DataParams, out: Path) -> dict[str, object]:
    """The 1,797 real handwritten digits shipped inside scikit-learn (no network)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / DIGITS_MAX_INTENSITY)).astype(np.uint8)
    image_set = ImageSet(pixels[..., np.newaxis], digits.target.astype(np.int64), DIGIT_NAMES)
    write_image_set(out / POOL_DIR, image_set)
    return {"layout": POOL_LAYOUT, "origin": "sklearn.datasets.load_digits"}


def _write_idx_splits(files: dict[str, Path], class_names: Sequence[str] | None, out: Path) -> None:
    from classifier.data.idx import read_idx

    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"]).astype(np.int64)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{files[f'{split}_images']}: expected uint8 images of shape (N, height, width), "
                f"got {images.dtype} {images.shape}"
            )
        if len(labels) != len(images):
            raise DataError(
                f"{files[f'{split}_labels']}: {len(labels)} labels for {len(images)} images"
            )
        names = class_names or tuple(str(label) for label in range(int(labels.max()) + 1))
        write_image_set(out / split, ImageSet(images[..., np.newaxis], labels, tuple(names)))


def fetch_idx_mirror(cfg: DataParams, out: Path) -> dict[str, object]:
    """MNIST or Fashion-MNIST from the first mirror that serves each file with its checksum."""
    from classifier.data.fetch import download_file

    dataset = IDX_DATASETS[cfg.source]
    mirrors = [*cfg.mirrors, *dataset.mirrors]
    downloads = out.parent / f".{out.name}.downloads"
    downloads.mkdir(exist_ok=True)
    try:
        files = {}
        for role, name in IDX_FILES.items():
            urls = [mirror.rstrip("/") + "/" + name for mirror in mirrors]
            files[role] = download_file(
                urls, downloads / name, sha256=dataset.sha256[role], max_bytes=IDX_MAX_BYTES
            )
        _write_idx_splits(files, dataset.class_names, out)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    return {"layout": SPLIT_LAYOUT, "mirrors": mirrors, "sha256": dataset.sha256}


def _find_idx_file(folder: Path, name: str) -> Path:
    for candidate in (name, name.removesuffix(".gz")):
        if (folder / candidate).is_file():
            return folder / candidate
    raise DataError(f"{folder}: no {name} (or {name.removesuffix('.gz')}) in this IDX folder")


def local_path(path: str) -> Path:
    """``data.path`` as a person means it: a relative path is relative to the project root.

    In the workspace that is where the stage runs; a queued or ``--temp`` experiment (and so
    every sweep trial) runs in DVC's copy under .dvc/tmp/exps/, and DVC sets ``DVC_ROOT``
    to the project it copied.
    """
    given = Path(path).expanduser()
    if given.is_absolute():
        return given
    return Path(os.environ.get("DVC_ROOT") or ".") / given


def fetch_idx_dir(cfg: DataParams, out: Path) -> dict[str, object]:
    """The four IDX files from a local folder (plain or gzipped); no checksums to check."""
    folder = local_path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    files = {role: _find_idx_file(folder, name) for role, name in IDX_FILES.items()}
    _write_idx_splits(files, None, out)
    return {"layout": SPLIT_LAYOUT, "path": str(folder.resolve())}


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _link_or_copy(real: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, target)
    except OSError:
        shutil.copyfile(real, target)


def _copy_listings(listings: dict[str, ClassFolders], dest: Path) -> None:
    """Copy (hard-link where possible) each listing's files into ``dest/<key>/<class>/``."""
    from tqdm import tqdm

    total = sum(len(found) for listing in listings.values() for found in listing.files.values())
    with tqdm(
        total=total, desc="copying images", unit="file", disable=not sys.stderr.isatty()
    ) as bar:
        for key, listing in listings.items():
            for name, found in listing.files.items():
                for relative, real in found:
                    _link_or_copy(real, dest / key / name / relative)
                    bar.update()


def _skipped(listing: ClassFolders, prefix: str = "") -> dict[str, list[dict[str, str]]]:
    """The links and folders ``listing`` skipped, logged, their paths under ``prefix``."""
    links = [{**link, "link": prefix + link["link"]} for link in listing.skipped_links]
    folders = [{**one, "folder": prefix + one["folder"]} for one in listing.skipped_folders]
    for skipped in links:
        log.warning("skipped link %s -> %s: %s", *skipped.values())
    for skipped in folders:
        log.warning("skipped folder %s with %s files: %s", *skipped.values())
    return {"skipped_links": links, "skipped_folders": folders}


def copy_class_folders(source: Path, dest: Path) -> dict[str, object]:
    """Copy (hard-link where possible) one subfolder of files per class.

    Links are followed only inside ``source`` (classifier/data/folders.py). Returns the
    files per class and the links skipped.
    """
    listing = list_class_folders(source)
    _copy_listings({"": listing}, dest)
    return {
        "files_per_class": {name: len(found) for name, found in listing.files.items()},
        **_skipped(listing),
    }


# Top folders that name a split, as downloaded image sets name them (Kaggle, CIFAR-10 as
# image files, many tutorials), and the split each one is.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}
SPLIT_ORDER = ("train", "val", "test")


def split_folders(source: Path, layout: str) -> dict[str, Path] | None:
    """The split folders of ``source`` by split (``data.layout``: auto, classes or splits),
    or None where its top folders are the classes."""
    tops = [p for p in sorted(Path(source).iterdir()) if not _is_hidden(p) and p.is_dir()]
    named = {path: SPLIT_FOLDERS.get(path.name.lower()) for path in tops}
    looks_split = all(named.values()) and {"train", "test"} <= set(named.values())
    if layout == "classes" or (layout == "auto" and not looks_split):
        return None
    if not looks_split:
        raise DataError(
            f"data.layout is splits, but the top folders of {source} are "
            f"{[path.name for path in tops]}: expected train/ and test/ (and val/, valid/ or "
            "validation/ if you have one), each holding the same class folders"
        )
    splits: dict[str, Path] = {}
    for path, split in named.items():
        if split in splits:
            raise DataError(f"{source}: {splits[split].name}/ and {path.name}/ are both {split}")
        splits[split] = path
    return {split: splits[split] for split in SPLIT_ORDER if split in splits}


def copy_split_folders(splits: dict[str, Path], dest: Path) -> dict[str, object]:
    """Copy each split's class folders into ``dest/<split>/<class>/``; the splits must hold
    the same classes, or nothing is copied and the difference is named."""
    listings = {split: list_class_folders(folder) for split, folder in splits.items()}
    train = set(listings["train"].files)
    for split, listing in listings.items():
        lacks, extra = sorted(train - set(listing.files)), sorted(set(listing.files) - train)
        if lacks or extra:
            said = [f"lacks {lacks}" if lacks else "", f"has {extra}, not train" if extra else ""]
            raise DataError(
                f"{splits[split]}: the {split} split {' and '.join(filter(None, said))}; every "
                f"split folder must hold the same class folders (or set data.layout: classes "
                "to read the top folders as classes)"
            )
    _copy_listings(listings, dest)
    skipped = [_skipped(listing, f"{splits[split].name}/") for split, listing in listings.items()]
    return {
        "splits": {split: splits[split].name for split in listings},
        "files_per_class": {
            split: {name: len(found) for name, found in listing.files.items()}
            for split, listing in listings.items()
        },
        "skipped_links": [link for part in skipped for link in part["skipped_links"]],
        "skipped_folders": [folder for part in skipped for folder in part["skipped_folders"]],
    }


def copy_image_folder(source: Path, dest: Path, layout: str) -> dict[str, object]:
    """Class folders, or split folders of class folders (see ``split_folders``)."""
    splits = split_folders(source, layout)
    if splits is None:
        return {"layout": FILES_LAYOUT, **copy_class_folders(source, dest)}
    log.info("%s: split folders %s, each of class folders", source, list(splits))
    return {"layout": SPLIT_FILES_LAYOUT, **copy_split_folders(splits, dest)}


def _class_root(extracted: Path) -> Path:
    """The folder holding the class folders: archives often wrap them in one top folder."""
    entries = [p for p in extracted.iterdir() if not _is_hidden(p)]
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if p.is_dir() and not _is_hidden(p)]
        if len(inner) >= 2:
            return entries[0]
    return extracted


def fetch_folder(cfg: DataParams, out: Path) -> dict[str, object]:
    """A folder with one subfolder of images per class, or train/ and test/ of them."""
    folder = local_path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    copied = copy_image_folder(folder, out / FILES_DIR, cfg.layout)
    return {"path": str(folder.resolve()), **copied}


def fetch_archive(cfg: DataParams, out: Path) -> dict[str, object]:
    """A .zip or .tar.gz of a class-folder tree, from a path or a URL, extracted safely."""
    from classifier.data.archive import extract_archive
    from classifier.data.fetch import download_file

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.archive-") as work:
        work_dir = Path(work)
        location = cfg.path
        if location.startswith(("https://", "http://", "file://")):
            archive = download_file(
                [location],
                work_dir / Path(location.split("?")[0]).name,
                sha256=None,
                max_bytes=ARCHIVE_MAX_BYTES,
            )
        else:
            archive = local_path(location)
            if not archive.is_file():
                raise DataError(f"data.path: {archive} is not a file")
        extracted = extract_archive(archive, work_dir / "extracted")
        copied = copy_image_folder(_class_root(extracted), out / FILES_DIR, cfg.layout)
    return {"archive": location, **copied}


# The labels file of a csv source, first found wins, and its column of file names: Kaggle's
# style, then Hugging Face's imagefolder metadata. Both name the class in ``label``.
LABEL_FILES = (("labels.csv", "filename"), ("metadata.csv", "file_name"))
LABEL_COLUMN = "label"


def _labelled_files(
    folder: Path, table: Path, column: str
) -> tuple[dict[str, list[tuple[str, Path]]], list[dict[str, str]]]:
    """The files of each label that ``table`` lists, and the rows it cannot use, with why."""
    import csv

    try:
        with table.open(newline="", encoding="utf-8-sig") as lines:
            reader = csv.DictReader(lines)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{table}: not a readable CSV file ({error})") from None
    if column not in columns or LABEL_COLUMN not in columns:
        raise DataError(f"{table}: expected the columns {column},{LABEL_COLUMN}; found {columns}")
    root = folder.resolve()
    files: dict[str, list[tuple[str, Path]]] = {}
    seen: dict[str, int] = {}
    skipped = []
    for line, row in enumerate(rows, start=2):  # the header is line 1
        name, label = (row.get(column) or "").strip(), (row.get(LABEL_COLUMN) or "").strip()
        real = (root / name).resolve()
        if not name:
            reason = "no file name"
        elif not label:
            reason = "no label"
        elif label.startswith(".") or "/" in label or "\\" in label:
            reason = f"the label {label!r} cannot name a class"
        elif name in seen:
            reason = f"the file is listed again (first on line {seen[name]})"
        elif not real.is_relative_to(root):
            reason = "the file is outside the folder"
        elif not real.is_file():
            reason = "no such file"
        else:
            seen[name] = line
            files.setdefault(label, []).append((name, real))
            continue
        where = f"{table.name} line {line}"
        skipped.append({"file": name or f"({where})", "reason": f"{where}: {reason}"})
    return files, skipped


def fetch_csv(cfg: DataParams, out: Path) -> dict[str, object]:
    """A folder of images and a CSV naming each one's class (see LABEL_FILES)."""
    folder = local_path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    found = [(folder / name, column) for name, column in LABEL_FILES if (folder / name).is_file()]
    if not found:
        raise DataError(
            f"{folder}: no labels.csv (columns filename,label) or metadata.csv "
            "(columns file_name,label)"
        )
    table, column = found[0]
    files, skipped = _labelled_files(folder, table, column)
    if len(files) < 2:
        raise DataError(f"{table}: need at least 2 labels with files, found {sorted(files)}")
    for skip in skipped:
        log.warning("skipped %s: %s", skip["file"], skip["reason"])
    listing = ClassFolders(files=dict(sorted(files.items())))
    _copy_listings({"": listing}, out / FILES_DIR)
    return {
        "layout": FILES_LAYOUT,
        "path": str(folder.resolve()),
        "labels_file": table.name,
        "files_per_class": {label: len(found) for label, found in listing.files.items()},
        "skipped_rows": skipped,
    }


SOURCES: dict[str, Callable[[DataParams, Path], dict[str, object]]] = {
    "digits": fetch_digits,
    "mnist": fetch_idx_mirror,
    "fashion_mnist": fetch_idx_mirror,
    "idx_dir": fetch_idx_dir,
    "folder": fetch_folder,
    "archive": fetch_archive,
    "csv": fetch_csv,
}


def fetch_source(cfg: DataParams, out_dir: Path) -> dict[str, object]:
    """Fetch the configured source into ``out_dir`` atomically; return its description."""
    with atomic_path(out_dir, directory=True) as tmp:
        description = {"source": cfg.source, **SOURCES[cfg.source](cfg, tmp)}
        write_json(tmp / SOURCE_FILE, description)
    log.info("fetched %s (%s layout) into %s", cfg.source, description["layout"], out_dir)
    return description
