"""Write outputs so a reader sees the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    The temporary keeps ``path``'s suffix (Keras insists on ``.keras``). On any error the
    temporary is removed and whatever was at ``path`` before stays untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp make private files; outputs get the usual umask-based permissions.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if directory else 0o666) & ~umask)
    try:
        yield tmp
        if directory and path.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside
            # first, so the window without either is a rename, not a copy.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as error:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            if error.errno is None:
                # A short write names no file and no cause (numpy: "N requested and M
                # written"): the disk, or the file size limit, ran out.
                raise OSError(
                    f"{path}: could not be written whole ({error}); is the disk full?"
                ) from error
            raise OSError(f"{path}: {error.strerror or error}") from error
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_writable(path: Path) -> None:
    """Raise OSError unless a file can be written at ``path`` (atomically, as here).

    Stages call it for every output before hours of work, not after: a folder where a file
    should be, or a folder that cannot be written, is found at once.
    """
    path = Path(path)
    if path.is_dir():
        raise OSError(f"{path}: is a folder, where the output file goes; move it away")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as error:
        raise OSError(f"{path}: cannot be written ({error.strerror or error})") from None
