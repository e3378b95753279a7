"""The pipeline's fixed costs: a no-op `dvc repro`, and what importing each stage costs.

Run in a project whose pipeline is up to date (after `make run`):

    python -m benchmarks.overhead              # 5 repetitions of each, interleaved
    python -m benchmarks.overhead --end-to-end # also a whole `dvc repro --force`

Each figure is the median wall time of fresh processes. Import times are against a bare
`python -c pass` timed in the same rounds, and the report says which heavy libraries each
stage module pulls in when imported: stages that do not train must not load TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import report

STAGE_MODULES = ("download", "preprocess", "label_issues", "train", "evaluate", "export")
HEAVY = ("tensorflow", "keras", "mlflow", "pandas", "sklearn", "matplotlib")
NO_OP_TARGET_S = 1.0
PROBE = (
    "import sys, time; t = time.perf_counter(); import stages.{module}; "
    "print(time.perf_counter() - t); "
    "print(','.join(m for m in {heavy!r} if m in sys.modules))"
)


def timed(command: Sequence[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one run of ``command``, and its stdout; fails loudly if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return elapsed, done.stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="an up-to-date project")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement")
    parser.add_argument(
        "--end-to-end", action="store_true", help="also time `dvc repro --force` (minutes)"
    )
    args = parser.parse_args(argv)

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["DVC_NO_ANALYTICS"] = "true"
    no_op, bare, imports = [], [], {module: [] for module in STAGE_MODULES}
    loaded: dict[str, str] = {}
    for _ in range(args.repeats):
        seconds, output = timed(["dvc", "repro"], args.project, env)
        if "Running stage" in output:
            raise SystemExit("the pipeline was not up to date: run `make run` first")
        no_op.append(seconds)
        bare.append(timed([sys.executable, "-c", "pass"], args.project, env)[0])
        for module in STAGE_MODULES:
            probe = PROBE.format(module=module, heavy=HEAVY)
            _, output = timed([sys.executable, "-c", probe], args.project, env)
            import_seconds, _, heavy = output.strip().partition("\n")
            imports[module].append(float(import_seconds))
            loaded[module] = heavy or "-"
    summary: dict[str, object] = {
        "no_op_dvc_repro_s": round(statistics.median(no_op), 3),
        "no_op_target_s": NO_OP_TARGET_S,
        "python_start_s": round(statistics.median(bare), 3),
        "stage_import_s": {m: round(statistics.median(t), 3) for m, t in imports.items()},
        "stage_imports_heavy": loaded,
        "repeats": args.repeats,
    }
    if args.end_to_end:
        seconds, _ = timed(["dvc", "repro", "--force"], args.project, env)
        summary["dvc_repro_force_s"] = round(seconds, 1)
    report("overhead", summary)
    print("\n| stage module | import s | heavy libraries loaded on import |")
    print("| --- | ---: | --- |")
    for module in STAGE_MODULES:
        print(f"| stages.{module} | {summary['stage_import_s'][module]:.2f} | {loaded[module]} |")
    print(f"\nno-op `dvc repro`: {summary['no_op_dvc_repro_s']:.2f} s (target {NO_OP_TARGET_S} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
