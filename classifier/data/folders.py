"""Read a folder of images laid out one subfolder per class, with one rule for links.

The rule: a symbolic link is followed when what it points at lies inside the folder
(``data.path``), whether it is a class folder, a subfolder or a file; a link that points
outside it, or at nothing, is skipped, and every skipped link is listed (in
``data/raw/source.json`` and the data report). So a folder of photos cannot pull in the
rest of the file system, and nothing is dropped without a word. A link that loops (to
itself, or round a chain of links) points at nothing. Hidden files and folders (names
starting with a dot) are skipped, as file managers hide them; a hidden folder beside the
class folders is listed, with its files, since it may be a class dropped by mistake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from classifier.errors import DataError


@dataclass
class ClassFolders:
    """The files of each class, by class name, and the links that were not followed."""

    files: dict[str, list[tuple[str, Path]]] = field(default_factory=dict)  # (relative, real)
    skipped_links: list[dict[str, str]] = field(default_factory=list)
    skipped_folders: list[dict[str, str]] = field(default_factory=list)


def _hidden(name: str) -> bool:
    return name.startswith(".")


@dataclass
class _Walk:
    """One walk over the tree under ``root``, following only the links that stay inside it."""

    root: Path
    listing: ClassFolders

    def inside(self, path: Path) -> Path | None:
        """The real path of ``path`` when it exists inside the root; None, noting why, if not."""
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
            real, reason = Path(os.readlink(path)), "is a loop of links"
        else:
            if real.is_relative_to(self.root) and real.exists():
                return real
            reason = "points outside the folder" if real.exists() else "points at nothing"
        self.listing.skipped_links.append(
            {"link": path.relative_to(self.root).as_posix(), "target": str(real), "reason": reason}
        )
        return None

    def files(
        self, folder: Path, relative: str = "", above: frozenset[Path] = frozenset()
    ) -> list[tuple[str, Path]]:
        """Every file below ``folder`` as (path relative to its class folder, real path).

        ``above`` holds the real folders this one is inside: a link back to one of them
        would loop, and is not followed.
        """
        real = folder.resolve()
        if real in above:
            return []
        above = above | {real}
        found = []
        for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
            if _hidden(entry.name):
                continue
            path, name = Path(entry.path), f"{relative}{entry.name}"
            target = self.inside(path) if entry.is_symlink() else path
            if target is None:
                continue
            if target.is_dir():
                found += self.files(path, f"{name}/", above)
            elif target.is_file():
                found.append((name, target))
        return found


def list_class_folders(source: Path) -> ClassFolders:
    """Each class folder of ``source`` and its files, by the rule in the module docstring."""
    if not Path(source).is_dir():
        raise DataError(f"{source}: not a folder")
    source = Path(source).resolve()
    listing = ClassFolders()
    walk = _Walk(source, listing)
    classes = []
    for entry in sorted(source.iterdir()):
        if _hidden(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                listing.skipped_folders.append(
                    {
                        "folder": entry.name,
                        "files": str(sum(len(files) for _, _, files in os.walk(entry))),
                        "reason": "hidden (its name starts with a dot)",
                    }
                )
            continue
        target = walk.inside(entry) if entry.is_symlink() else entry
        if target is not None and target.is_dir():
            classes.append(entry)
    if len(classes) < 2:
        raise DataError(
            f"{source}: need one subfolder per class and at least 2 classes, found "
            f"{[p.name for p in classes] or 'none'}"
        )
    for folder in classes:
        found = walk.files(folder)
        if not found:
            raise DataError(f"{folder}: class folder {folder.name!r} holds no files")
        listing.files[folder.name] = found
    return listing
