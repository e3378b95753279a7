"""Ingest of a photo folder: the pipeline's download + preprocess against a plain script.

Generates a folder of JPEG photos of mixed sizes, then times, each in a fresh process so
peak memory is its own: (a) the baseline a user would write, which opens every file with
PIL, converts and resizes it and collects the arrays in a list; (b) the pipeline's
download and preprocess stages. Checks that each wrote every photo at the target size,
then prints and writes (benchmarks/results/ingest.json) images/s and peak RSS for both,
and the speedup: the baseline's seconds over the pipeline's.

    python -m benchmarks.ingest --images 3000 --size 64
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import report

BASELINE = """
import sys, numpy as np
from pathlib import Path
from PIL import Image
root, size = Path(sys.argv[1]), int(sys.argv[2])
images, labels = [], []
for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
    for path in sorted(folder.iterdir()):
        picture = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        images.append(np.asarray(picture)); labels.append(label)
np.save(Path(sys.argv[3]) / "images.npy", np.stack(images))
"""

PIPELINE = """
import sys, yaml
from pathlib import Path
from classifier.config import parse_params
from stages import download, preprocess
root, size, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
raw = yaml.safe_load(Path("params.yaml").read_text())
raw["data"].update(source="folder", path=str(root))
raw["preprocess"].update(image_height=size, image_width=size, channels=3)
params = parse_params(raw)
download.run(params.data, out_dir=out / "raw")
preprocess.run(
    params.preprocess,
    raw_dir=out / "raw",
    out_dir=out / "prepared",
    metrics_path=out / "data.json",
    report_path=out / "data.md",
)
"""


def make_photos(root: Path, count: int, seed: int = 0) -> int:
    """Write ``count`` JPEGs of 160 to 1600 pixels a side in two class folders; return bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for index in range(count):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (int(v) for v in rng.integers(160, 1600, size=2))
        # Smooth gradients plus noise compress like photos, unlike pure noise.
        ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
        noise = rng.integers(0, 55, (height, width, 3)).astype(np.float32)
        pixels = np.clip(ramp + noise, 0, 255).astype(np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
        total += path.stat().st_size
    return total


def timed(script: str, *args: str) -> dict[str, float]:
    """Run ``script`` in a fresh Python; its wall time and its own peak resident memory."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", script, *args])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def images_written(name: str, out: Path) -> tuple[int, ...]:
    """The shape of everything ``name`` (pipeline or baseline) wrote under ``out``:
    (images, height, width, channels), all splits together for the pipeline."""
    if name == "baseline":
        return tuple(np.load(out / "images.npy", mmap_mode="r").shape)
    from classifier.data.dataset import read_splits

    splits = read_splits(out / "prepared").values()
    shapes = {split.image_shape for split in splits}
    if len(shapes) != 1:
        raise SystemExit(f"the pipeline wrote splits of different image shapes: {shapes}")
    return (sum(len(split.labels) for split in splits), *shapes.pop())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=3000, help="photos to generate")
    parser.add_argument("--size", type=int, default=64, help="target height and width")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        photos = Path(work) / "photos"
        megabytes = make_photos(photos, args.images) / 2**20
        results = {}
        for name, script in (("pipeline", PIPELINE), ("baseline", BASELINE)):
            out = Path(work) / name
            out.mkdir()
            results[name] = timed(script, str(photos), str(args.size), str(out))
            # Both sides must have done the whole job: every photo, at the target size.
            shape, expected = images_written(name, out), (args.images, args.size, args.size, 3)
            if shape != expected:
                raise SystemExit(f"{name} wrote images of shape {shape}, expected {expected}")
            results[name]["images_per_second"] = args.images / results[name]["seconds"]
    summary = {
        "images": args.images,
        "photo_megabytes": round(megabytes, 1),
        "target": f"{args.size}x{args.size}x3",
        **{name: {k: round(v, 2) for k, v in r.items()} for name, r in results.items()},
        "speedup": round(results["baseline"]["seconds"] / results["pipeline"]["seconds"], 2),
    }
    report("ingest", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
