"""The layout is the architecture: thin stages, the library apart, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.helpers import PROJECT_ROOT, STAGES

# Longer than this, a function needs a comment above it saying why it is one piece.
MAX_FUNCTION_LINES = 60
LONG_BECAUSE = "# Long because"
CODE = ("classifier", "stages", "tools")


def test_stages_holds_the_pipelines_stage_modules_and_nothing_else():
    # The five stages of every run, and label_issues, which is optional (off by default).
    modules = {path.stem for path in (PROJECT_ROOT / "stages").glob("*.py")}
    assert modules == {"__init__", *STAGES}
    pipeline = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    assert list(pipeline["stages"]) == STAGES


def long_functions(path: Path) -> list[str]:
    """Functions in ``path`` over the limit without a ``# Long because`` comment above them."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        reason = lines[first - 2].strip() if first >= 2 else ""
        if length > MAX_FUNCTION_LINES and not reason.startswith(LONG_BECAUSE):
            found.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name} ({length})")
    return found


def test_no_function_is_over_sixty_lines_without_a_reason_beside_it():
    too_long = [
        found
        for root in CODE
        for path in sorted((PROJECT_ROOT / root).rglob("*.py"))
        for found in long_functions(path)
    ]
    assert too_long == []


def test_a_long_function_without_a_reason_is_found(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    module = tmp_path / "module.py"
    module.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    monkeypatch.setattr("tests.pipeline.test_layout.PROJECT_ROOT", tmp_path)
    assert long_functions(module) == [f"module.py:5 long ({MAX_FUNCTION_LINES + 1})"]
    module.write_text(f"{LONG_BECAUSE} it is a test.\ndef long():\n{body}\n")
    assert long_functions(module) == []


def test_no_pipeline_output_is_tracked_by_git():
    """DVC refuses to write an output git tracks ("already tracked by SCM"): one committed
    by mistake breaks `make run` on every fresh clone."""
    import subprocess

    pipeline = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    outputs = set()
    for stage in pipeline["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                outputs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    tracked = subprocess.run(
        ["git", "ls-files", "--", *sorted(outputs)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert tracked == []
