"""Download one file from a list of mirrors: streamed, size-capped, retried, checksummed.

Each attempt streams into a temporary file beside the destination while hashing it; the
file is renamed into place only when it is whole and its sha256 matches, so a failed or
interrupted download (Ctrl-C included) leaves nothing behind and never replaces a good file.

Transient failures (HTTP 5xx and 429, refused or dropped connections, timeouts, bodies
shorter than their Content-Length) are retried on the same URL with exponential backoff;
anything else (HTTP 4xx, a missing file, a wrong checksum, a body over the size cap) moves
on to the next mirror at once.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from classifier.atomic import atomic_path
from classifier.errors import StageError

logger = logging.getLogger(__name__)

# Some mirrors answer urllib's default "Python-urllib/3.x" with 403.
USER_AGENT = "image-classification-pipeline/0.1 (python urllib)"
SCHEMES = ("http", "https", "file")
CHUNK_SIZE = 1 << 16
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
TOO_MANY_REQUESTS = 429


class DownloadError(StageError):
    """No mirror delivered the file intact."""


class _Transient(Exception):
    """Worth retrying on the same URL: server errors, resets, timeouts, cut bodies."""


class _Permanent(Exception):
    """Not worth retrying on this URL: move on to the next mirror."""


def _reason(error: BaseException) -> str:
    """A short human reason for a network or file error."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _open(url: str, timeout: float) -> BinaryIO:
    """The response for ``url``, or _Transient/_Permanent saying why there is none."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise _Permanent(f"unsupported URL (expected {', '.join(f'{s}://' for s in SCHEMES)})")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == TOO_MANY_REQUESTS or error.code >= 500:
            raise _Transient(f"HTTP {error.code}") from None
        raise _Permanent(f"HTTP {error.code}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if scheme == "file":
            raise _Permanent(
                _reason(reason) if isinstance(reason, OSError) else str(reason)
            ) from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise _Permanent(f"TLS certificate rejected: {reason.verify_message}") from None
        raise _Transient(
            _reason(reason) if isinstance(reason, BaseException) else str(reason)
        ) from None
    except http.client.InvalidURL as error:
        raise _Permanent(f"invalid URL: {error}") from None
    except (OSError, http.client.HTTPException) as error:
        # Raised by urlopen as is, not wrapped in URLError: a timeout or a dropped
        # connection while waiting for the status line.
        raise _Transient(_reason(error)) from None


def _content_length(response: BinaryIO) -> int | None:
    """The declared body size, or None when the server gives none (or nonsense)."""
    header = response.headers.get("Content-Length")  # type: ignore[attr-defined]
    return int(header) if header and header.strip().isdigit() else None


def _fetch_once(
    url: str,
    target: Path,
    *,
    name: str,
    sha256: str | None,
    max_bytes: int,
    timeout: float,
    progress: bool,
) -> None:
    """Stream ``url`` into ``target`` once, checking size and checksum."""
    with _open(url, timeout) as response:
        expected = _content_length(response)
        if expected is not None and expected > max_bytes:
            raise _Permanent(f"Content-Length {expected} is over the {max_bytes}-byte limit")
        digest = hashlib.sha256()
        received = 0
        with (
            target.open("wb") as out,
            tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                desc=name,
                disable=not progress,
            ) as bar,
        ):
            # read1 returns what has arrived instead of waiting for a whole chunk.
            read = getattr(response, "read1", response.read)
            while True:
                try:
                    chunk = read(CHUNK_SIZE)
                except (OSError, http.client.HTTPException) as error:
                    raise _Transient(
                        f"connection broke after {received} bytes: {_reason(error)}"
                    ) from None
                if not chunk:
                    break
                received += len(chunk)
                if received > max_bytes:
                    raise _Permanent(f"body is over the {max_bytes}-byte limit")
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    if expected is not None and received < expected:
        raise _Transient(f"truncated body: {received} of {expected} bytes")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise _Permanent(f"sha256 mismatch (expected {sha256}, got {digest.hexdigest()})")


def download_file(
    urls: Sequence[str],
    dest: Path,
    *,
    sha256: str | None,
    max_bytes: int,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool | None = None,
) -> Path:
    """Fetch ``dest`` from the first of ``urls`` (http, https or file) that delivers it intact.

    Transient failures are retried on the same URL ``retries`` times, waiting
    ``backoff * 2**attempt`` seconds; anything else moves on to the next URL. Raises
    DownloadError naming every URL and why it failed when none delivers.
    """
    dest = Path(dest)
    if isinstance(urls, str):
        raise TypeError("urls must be a sequence of URLs, not one string")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"{dest.name}: sha256 must be 64 hex digits, got {sha256!r}")
    if max_bytes < 1 or retries < 0 or backoff < 0 or timeout <= 0:
        raise ValueError(
            f"{dest.name}: need max_bytes >= 1, retries >= 0, backoff >= 0 and timeout > 0, "
            f"got {max_bytes}, {retries}, {backoff}, {timeout}"
        )
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    fetch = partial(
        _fetch_once, name=dest.name, sha256=sha256, max_bytes=max_bytes, timeout=timeout,
        progress=progress,
    )  # fmt: skip
    failures = []
    for number, url in enumerate(urls, start=1):
        failure = _try_url(url, dest, fetch, retries=retries, backoff=backoff)
        if failure is None:
            return dest
        failures.append(failure)
        if number < len(urls):
            logger.warning("%s: %s; trying the next mirror", dest.name, failure)
    if not failures:
        raise DownloadError(f"{dest.name}: no URL to download it from")
    raise DownloadError(f"{dest.name}: every mirror failed: {'; '.join(failures)}")


def _try_url(
    url: str, dest: Path, fetch: Callable[[str, Path], None], *, retries: int, backoff: float
) -> str | None:
    """Fetch ``url`` into ``dest``, retrying transient failures; None, or why it failed."""
    for attempt in range(retries + 1):
        try:
            with atomic_path(dest) as tmp:
                fetch(url, tmp)
            return None
        except _Permanent as error:
            return f"{url}: {error}"
        except _Transient as error:
            last_error = error
            if attempt < retries:
                delay = backoff * 2**attempt
                logger.warning(
                    "%s: %s from %s; retry %d of %d in %.2g s",
                    dest.name,
                    error,
                    url,
                    attempt + 1,
                    retries,
                    delay,
                )
                time.sleep(delay)
    return f"{url}: {last_error} (after {retries + 1} tries)"
