"""Full-scale accuracy: the pipeline's stages on the real MNIST, as the idx_dir source.

Runs download, preprocess, train and evaluate (each stage's real ``run``) on the 70,000
digits in ``../shared/data/mnist`` in a temporary folder with its own MLflow store, and
reports test accuracy on MNIST's own 10,000 test digits with the time of each stage.

    python -m benchmarks.mnist --epochs 10 --batch-size 64
    python -m benchmarks.mnist --architecture small_bn_cnn --epochs 30 --batch-size 128 \
        -S train.schedule=warmup_cosine -S train.augment=affine -S train.learning_rate=0.003
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import report

SHARED_MNIST = Path("../shared/data/mnist")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mnist",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="folder of IDX files")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--architecture", default="reference_cnn")
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a params.yaml value, as dvc exp run -S does (repeatable)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the stages' outputs (prepared data, model/, plots/, mlflow.db) in this "
        "folder; default: a temporary folder, removed at the end",
    )
    args = parser.parse_args(argv)

    from classifier.config import parse_params
    from stages import download, evaluate, preprocess, train

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["data"].update(source="idx_dir", path=str(args.data.resolve()))
    raw["preprocess"].update(image_height=28, image_width=28, channels=1, val_fraction=0.1)
    raw["train"].update(
        architecture=args.architecture, epochs=args.epochs, batch_size=args.batch_size
    )
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        raw[section][name] = overrides[key] = yaml.safe_load(value)
    params = parse_params(raw, "params.yaml (benchmark overrides)")

    seconds = {}
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            root = args.work_dir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        outputs = train.TrainOutputs.under(root / "model")
        started = time.perf_counter()
        download.run(params.data, out_dir=root / "raw")
        seconds["download"] = time.perf_counter() - started
        started = time.perf_counter()
        preprocess.run(
            params.preprocess,
            raw_dir=root / "raw",
            out_dir=root / "prepared",
            metrics_path=root / "data.json",
            report_path=root / "data.md",
        )
        seconds["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        result = train.run(params, data_dir=root / "prepared", outputs=outputs)
        seconds["train"] = time.perf_counter() - started
        started = time.perf_counter()
        metrics = evaluate.run(
            params.evaluate,
            data_dir=root / "prepared",
            model_path=outputs.model,
            run_info_path=outputs.run_info,
            history_path=outputs.history,
            metrics_path=root / "evaluate.json",
            plots_dir=root / "plots",
            lock_path=root / "dvc.lock",  # none: no DVC here
        )
        seconds["evaluate"] = time.perf_counter() - started
        data = json.loads((root / "data.json").read_text())

    summary = {
        "data": str(args.data),
        "images": data["images"],
        "architecture": args.architecture,
        "parameters": result.model.count_params(),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "overrides": overrides,
        "test_accuracy": round(metrics["accuracy"], 4),
        "test_loss": round(metrics["loss"], 4),
        "val_accuracy_by_epoch": [round(v, 4) for v in result.history["val_accuracy"]],
        "seconds": {stage: round(value, 1) for stage, value in seconds.items()},
        "seconds_per_epoch": round(seconds["train"] / args.epochs, 1),
    }
    report(f"mnist-{args.architecture}", summary)  # one file per architecture
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
