"""Stage ``export``: log the trained model to MLflow and register it in the model registry.

Registers a new version of ``export.model_name`` from the training run, with a signature
and an input example, points ``export.alias`` at it, and writes what it registered to a
file DVC tracks. Registration is the last step: a failure before it registers nothing.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from stages import tracking
from stages.atomic import write_json
from stages.cli import MODEL, PREPARED, RUN_INFO, run_stage, stage_parser
from stages.config import ExportParams, load_params
from stages.dataset import read_image_set

log = logging.getLogger(__name__)

INPUT_EXAMPLE_SIZE = 4


def run(
    cfg: ExportParams,
    data_dir: Path,
    model_path: Path,
    run_info_path: Path,
    registered_path: Path,
) -> dict[str, str | int]:
    """Register ``model_path`` under ``cfg.model_name`` and write the registration record."""
    from stages.model import load_model

    run_id = tracking.read_run_id(run_info_path)
    input_example = read_image_set(Path(data_dir) / "test").images[:INPUT_EXAMPLE_SIZE]
    model = load_model(str(model_path))
    with tracking.resumed_run(run_id):
        registered = tracking.register_model(model, cfg.model_name, cfg.alias, input_example)
    write_json(registered_path, registered)
    return registered


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_parser(
        "export",
        "Register the trained model in the MLflow model registry (params: export.*).",
        data=PREPARED,
        model=MODEL,
        run_info=RUN_INFO,
        out=("lineage/registered_model.json", "registration record out"),
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "export",
        lambda: run(
            load_params(args.params).export, args.data, args.model, args.run_info, args.out
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
