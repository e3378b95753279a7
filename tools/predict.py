"""Predict the class of image files with the trained model.

    python -m tools.predict photo.jpg scans/ ...
    python -m tools.predict --json scans/ > predictions.jsonl

Prints one line per image: its path, the predicted class and the confidence, separated by
tabs; a path or class name holding a tab, a newline, a quote or a backslash is written as
a JSON string, so the columns stay three. ``--json`` prints one JSON object per line
instead. Files that are not usable images get one line each on stderr, and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from classifier.cli import MODEL, PREPARED, exit_process, run_stage
from classifier.config import load_params
from classifier.serving.files import predict, read_labels

# Characters that would break a tab-separated line, or be read back as something else.
UNSAFE_IN_TSV = ("\t", "\n", "\r", "\\", '"')


def tsv_field(value: object) -> str:
    """``value`` as text, or as a JSON string where it holds a character TSV cannot."""
    text = str(value)
    return json.dumps(text) if any(char in text for char in UNSAFE_IN_TSV) else text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.predict",
        description="Print the predicted class and confidence of image files or folders.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of them")
    parser.add_argument("--model", type=Path, default=Path(MODEL[0]), help=MODEL[1])
    parser.add_argument(
        "--labels",
        type=Path,
        default=Path(PREPARED[0]) / "classes.json",
        help="class names, in the model's output order",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (for the resize policy)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"path", "class_name", "confidence"}',
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    failed = []

    def body() -> None:
        class_names = read_labels(args.labels)
        resize = load_params(args.params).preprocess.resize
        predictions, failures = predict(args.images, args.model, class_names, resize)
        for path, name, confidence in predictions:
            if args.json:
                row = {"path": str(path), "class_name": name, "confidence": round(confidence, 6)}
                print(json.dumps(row))
            else:
                print(f"{tsv_field(path)}\t{tsv_field(name)}\t{confidence:.4f}")
        for path, reason in failures:
            print(f"predict: error: {tsv_field(path)}: {reason}", file=sys.stderr)
        failed.extend(failures)

    code = run_stage("predict", body)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    exit_process(main())
