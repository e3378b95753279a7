"""The project's own import graph, read from the source: which files a module needs.

Two things depend on it being exact. DVC reruns a stage when one of its ``deps`` changes,
so ``dvc.yaml`` must list every project file a stage imports (a test compares the two);
and a registered model ships the serving code it imports and nothing else. Every
``import`` statement counts, at module level or inside a function: a lazy import runs
too, just later. Imports of anything outside the project are ignored.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The project's importable top-level packages.
PACKAGES = ("classifier", "stages", "tools")
INIT = "__init__.py"


def module_path(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of project module ``module`` (a package's ``__init__.py``), or None."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / INIT).is_file():
        return base / INIT
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages first."""
    parts = module.split(".")
    return [".".join(parts[: end + 1]) for end in range(len(parts))]


def _package_of(module: str, path: Path) -> str:
    return module if path.name == INIT else module.rpartition(".")[0]


def imported_modules(module: str, root: Path = PROJECT_ROOT) -> set[str]:
    """The project modules that ``module``'s source imports directly, parents included."""
    path = module_path(module, root)
    if path is None:
        raise ModuleNotFoundError(f"{module}: not a module of this project under {root}")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, path).split(".")
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from a import b`` imports a, and a.b too when b is a submodule.
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if module_path(name, root) is not None:
                found.update(m for m in _with_parents(name) if module_path(m, root))
    return found


def project_imports(modules: Iterable[str], root: Path = PROJECT_ROOT) -> set[str]:
    """Every project module that importing ``modules`` may run, themselves included."""
    pending = [m for start in modules for m in _with_parents(start) if module_path(m, root)]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending.extend(imported_modules(module, root) - seen)
    return seen


def project_files(modules: Iterable[str], root: Path = PROJECT_ROOT) -> set[Path]:
    """The source files of :func:`project_imports`, relative to ``root``."""
    return {
        module_path(module, root).relative_to(root)  # type: ignore[union-attr]
        for module in project_imports(modules, root)
    }


def source_files(directory: Path, root: Path = PROJECT_ROOT) -> set[Path]:
    """Every ``.py`` file under ``directory`` (relative to ``root``), caches excluded."""
    return {
        path.relative_to(root)
        for path in (root / directory).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def dvc_deps(files: set[Path], root: Path = PROJECT_ROOT) -> list[str]:
    """``files`` as dvc.yaml lists them: a folder whose every source file is in ``files``
    stands for them all; the rest are listed one by one. Sorted."""
    folders = {parent for path in files for parent in path.parents if parent != Path(".")}
    # Largest first, so a covered folder swallows its covered subfolders.
    covered: list[Path] = []
    for folder in sorted(folders, key=lambda f: len(f.parts)):
        if any(folder.is_relative_to(done) for done in covered):
            continue
        if source_files(folder, root) <= files:
            covered.append(folder)
    listed = {folder.as_posix() for folder in covered}
    listed |= {
        path.as_posix()
        for path in files
        if not any(path.is_relative_to(folder) for folder in covered)
    }
    return sorted(listed)
