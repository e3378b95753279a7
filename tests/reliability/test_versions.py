"""Version floors that close published advisories, checked where they are declared and used.

A floor must hold in three places: pyproject.toml (what a fresh resolve may pick),
uv.lock (what `uv sync` installs) and this environment (what the tests just ran).
"""

from __future__ import annotations

import importlib.metadata
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import PROJECT_ROOT

# package -> advisory -> the first version with the fix.
ADVISORIES: dict[str, dict[str, str]] = {
    "keras": {
        "CVE-2025-1550: safe_mode bypass via a config.json naming arbitrary modules": "3.9.0",
        "CVE-2025-8747: safe_mode bypass in .keras loading": "3.11.0",
        "CVE-2025-9906: config.json re-enables unsafe deserialization": "3.11.0",
        "CVE-2025-9905: HDF5 (.h5) models load Lambda code despite safe_mode": "3.11.3",
        "GHSA-hqp4-2352-xf5r: path traversal when extracting archives": "3.14.0",
    },
    "mlflow": {
        "GHSA-gq3w-7jj3-x7gr: default admin password in basic auth": "3.16.1",
    },
}
FLOORS = {
    package: max(Version(fixed) for fixed in fixes.values())
    for package, fixes in ADVISORIES.items()
}


def declared_floor(package: str) -> Version:
    """The lowest version pyproject.toml allows for ``package`` (its ``>=`` bound)."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    (requirement,) = [r for r in requirements if r.name.lower() == package]
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    assert bounds, f"pyproject.toml: {requirement} has no lower bound"
    return max(bounds)


def locked_version(package: str) -> Version:
    """The version uv.lock pins for ``package``."""
    lock = tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())
    (version,) = [p["version"] for p in lock["package"] if p["name"] == package]
    return Version(version)


def test_floors_are_the_newest_fix_of_each_advisory():
    expected = {"keras": Version("3.14.0"), "mlflow": Version("3.16.1")}
    assert expected == FLOORS


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_installed_version_has_every_fix(package):
    installed = Version(importlib.metadata.version(package))
    missing = [a for a, fixed in ADVISORIES[package].items() if installed < Version(fixed)]
    assert missing == [], f"{package} {installed} lacks the fixes for {missing}"


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_pyproject_floor_excludes_every_vulnerable_version(package):
    assert declared_floor(package) >= FLOORS[package]


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_uv_lock_pins_a_version_with_every_fix(package):
    assert locked_version(package) >= FLOORS[package]
