"""dvc.yaml's code deps are exactly the project files each stage imports, and DVC sees them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from classifier.codebase import dvc_deps, imported_modules, project_files
from tests.helpers import PROJECT_ROOT, STAGES, copy_project, init_git, run_ok

CODE_ROOTS = ("classifier", "stages", "tools")


def listed_code_deps(stage: str) -> list[str]:
    """The deps of ``stage`` in the project's dvc.yaml that are code, not data."""
    pipeline = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    deps = pipeline["stages"][stage]["deps"]
    return sorted(dep for dep in deps if dep.split("/")[0] in CODE_ROOTS)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_lists_exactly_the_project_code_it_imports(stage):
    expected = dvc_deps(project_files([f"stages.{stage}"]))
    listed = listed_code_deps(stage)
    block = "".join(f"      - {dep}\n" for dep in expected)
    assert listed == expected, (
        f"dvc.yaml, stage {stage}: missing {sorted(set(expected) - set(listed))}, "
        f"not imported {sorted(set(listed) - set(expected))}; its code deps should be:\n{block}"
    )


def test_no_stage_imports_another_stage():
    for stage in STAGES:
        others = {f"stages.{other}" for other in STAGES if other != stage}
        assert not imported_modules(f"stages.{stage}") & others, stage


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_imports_count_lazy_relative_and_submodule_imports_and_their_packages(tmp_path):
    write_tree(
        tmp_path,
        {
            "classifier/__init__.py": "",
            "classifier/a.py": "import os\nfrom classifier.pkg import b\n",
            "classifier/pkg/__init__.py": "",
            "classifier/pkg/b.py": "def f():\n    from . import c\n    return c\n",
            "classifier/pkg/c.py": "import numpy\n",
            "classifier/unused.py": "",
            "stages/__init__.py": "",
            "stages/one.py": "import classifier.a\n",
        },
    )
    found = {path.as_posix() for path in project_files(["stages.one"], tmp_path)}
    assert found == {
        "stages/__init__.py",
        "stages/one.py",
        "classifier/__init__.py",
        "classifier/a.py",
        "classifier/pkg/__init__.py",
        "classifier/pkg/b.py",
        "classifier/pkg/c.py",
    }
    # A folder is listed whole only when every file in it is imported.
    assert dvc_deps({Path(p) for p in found}, tmp_path) == [
        "classifier/__init__.py",
        "classifier/a.py",
        "classifier/pkg",
        "stages",
    ]


def stand_in_outputs() -> dict[str, str]:
    """A stand-in for every output in dvc.yaml (a file, or a file in an output folder, and
    any dependency inside one), so `dvc commit` can record a lock without a run."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"].values()
    outputs = {
        next(iter(entry)) if isinstance(entry, dict) else entry
        for stage in stages
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, [])
    }
    folders = {out for out in outputs if not Path(out).suffix}
    inside = {
        dep for stage in stages for dep in stage.get("deps", [])
        if any(dep.startswith(folder + "/") for folder in folders)
    }  # fmt: skip
    files = (outputs - folders) | inside
    files |= {f"{folder}/stand-in.txt" for folder in folders if not any(
        name.startswith(folder + "/") for name in inside)}  # fmt: skip
    return {name: "{}" if name.endswith(".json") else "" for name in sorted(files)}


def changed_stages(repo: Path) -> set[str]:
    """The stages `dvc status` says are out of date."""
    status = yaml.safe_load(run_ok(repo, "dvc", "status", "--json").strip().splitlines()[-1])
    return set(status)


@pytest.mark.slow
def test_editing_an_imported_helper_makes_dvc_status_name_exactly_the_stages_importing_it(
    tmp_path,
):
    copy_project(tmp_path)
    init_git(tmp_path)
    write_tree(tmp_path, stand_in_outputs())
    run_ok(tmp_path, "dvc", "commit", "--force", "--quiet")
    assert changed_stages(tmp_path) == set()

    # images.py: preprocess decodes with it; export's served model imports it.
    with (tmp_path / "classifier/data/images.py").open("a") as helper:
        helper.write("\n# an edit\n")
    assert changed_stages(tmp_path) == {"preprocess", "export"}

    run_ok(tmp_path, "dvc", "commit", "--force", "--quiet")
    # A file in a folder that dvc.yaml lists whole (train imports all of training/, and so
    # does label_issues, which trains its fold models with the same loop).
    with (tmp_path / "classifier/training/augment.py").open("a") as helper:
        helper.write("\n# an edit\n")
    assert changed_stages(tmp_path) == {"train", "label_issues"}
