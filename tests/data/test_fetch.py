"""The downloader against a real HTTP server on 127.0.0.1 that misbehaves on request."""

import hashlib
import logging
import re
import signal
import socket
import time

import numpy as np
import pytest

from classifier.data.fetch import USER_AGENT, DownloadError, download_file
from classifier.data.idx import read_idx, write_idx
from tests.helpers import ScriptedServer

NAME = "train-images-idx3-ubyte.gz"
IMAGES = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    """A small gzipped IDX file, the kind the pipeline downloads."""
    path = tmp_path_factory.mktemp("served") / NAME
    write_idx(path, IMAGES)
    return path.read_bytes()


def sha256_of(content):
    return hashlib.sha256(content).hexdigest()


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.httpd.shutdown()
    scripted.httpd.server_close()


def fetch(urls, dest, content=None, **options):
    """download_file with test defaults: fast backoff, short timeouts, 1 MiB cap."""
    options = {
        "sha256": None if content is None else sha256_of(content),
        "max_bytes": 1 << 20,
        "timeout": 2,
        "backoff": 0.01,
        "progress": False,
        **options,
    }
    return download_file(urls, dest, **options)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def closed_port_url(path):
    with socket.socket() as probe:  # bound but never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}{path}"


def test_good_download_is_whole_checksummed_and_leaves_no_temporary(tmp_path, server, payload):
    dest = fetch([server.url(f"/{NAME}", ("ok", payload))], tmp_path / NAME, payload)
    assert dest == tmp_path / NAME
    assert dest.read_bytes() == payload
    assert sha256_of(dest.read_bytes()) == sha256_of(payload)
    np.testing.assert_array_equal(read_idx(dest), IMAGES)
    assert listing(tmp_path) == [NAME]


def test_requests_carry_a_user_agent_of_our_own(tmp_path, server, payload):
    fetch([server.url("/f", ("ok", payload))], tmp_path / NAME)
    assert server.user_agents == [USER_AGENT]


def test_checksum_is_optional(tmp_path, server, payload):
    dest = fetch([server.url("/f", ("ok", payload))], tmp_path / NAME, sha256=None)
    assert dest.read_bytes() == payload


def test_checksum_is_compared_case_insensitively(tmp_path, server, payload):
    url = server.url("/f", ("ok", payload))
    dest = fetch([url], tmp_path / NAME, sha256=sha256_of(payload).upper())
    assert dest.read_bytes() == payload


def test_checksum_mismatch_fails_naming_file_url_and_both_hashes(tmp_path, server, payload):
    wrong = payload[::-1]
    url = server.url(f"/a/{NAME}", ("ok", wrong))
    message = (
        rf"^{re.escape(NAME)}: every mirror failed: {re.escape(url)}: sha256 mismatch "
        rf"\(expected {sha256_of(payload)}, got {sha256_of(wrong)}\)$"
    )
    with pytest.raises(DownloadError, match=message):
        fetch([url], tmp_path / NAME, payload)
    assert listing(tmp_path) == []
    assert server.requests[f"/a/{NAME}"] == 1  # a wrong file is not fetched again from there


def test_checksum_mismatch_moves_on_to_the_next_mirror(tmp_path, server, payload):
    bad = server.url("/a/f", ("ok", payload[:-1] + b"x"))
    good = server.url("/b/f", ("ok", payload))
    assert fetch([bad, good], tmp_path / NAME, payload).read_bytes() == payload
    assert server.requests == {"/a/f": 1, "/b/f": 1}


def test_truncated_body_is_retried_and_then_succeeds(tmp_path, server, payload):
    url = server.url("/f", ("truncate", payload[:1000]), ("ok", payload))
    assert fetch([url], tmp_path / NAME, payload).read_bytes() == payload
    assert server.requests["/f"] == 2
    assert listing(tmp_path) == [NAME]


def test_body_that_stays_truncated_fails_after_the_retries(tmp_path, server, payload):
    url = server.url("/f", ("truncate", payload[:1000]))
    with pytest.raises(
        DownloadError,
        match=rf"{re.escape(url)}: truncated body: 1000 of 2000 bytes \(after 3 tries\)$",
    ):
        fetch([url], tmp_path / NAME, payload, retries=2)
    assert server.requests["/f"] == 3
    assert listing(tmp_path) == []


def test_404_moves_on_to_the_next_mirror_without_retrying(tmp_path, server, payload, caplog):
    missing = server.url(f"/a/{NAME}", ("status", 404))
    good = server.url(f"/b/{NAME}", ("ok", payload))
    with caplog.at_level(logging.WARNING, logger="classifier.data.fetch"):
        assert fetch([missing, good], tmp_path / NAME, payload).read_bytes() == payload
    assert server.requests == {f"/a/{NAME}": 1, f"/b/{NAME}": 1}
    assert [r.getMessage() for r in caplog.records] == [
        f"{NAME}: {missing}: HTTP 404; trying the next mirror"
    ]


@pytest.mark.parametrize("code", [400, 403, 410])
def test_client_errors_are_not_retried(tmp_path, server, code):
    url = server.url("/f", ("status", code))
    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: HTTP {code}$"):
        fetch([url], tmp_path / NAME)
    assert server.requests["/f"] == 1


def test_transient_server_errors_are_retried_with_exponential_backoff(
    tmp_path, server, payload, caplog
):
    url = server.url("/f", ("status", 500), ("status", 429), ("status", 503), ("ok", payload))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="classifier.data.fetch"):
        dest = fetch([url], tmp_path / NAME, payload, backoff=0.1)
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.4
    assert dest.read_bytes() == payload
    assert server.requests["/f"] == 4
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 3
    assert "HTTP 500" in caplog.records[0].getMessage()
    assert "retry 3 of 3 in 0.4 s" in caplog.records[2].getMessage()


def test_server_errors_that_persist_fail_after_the_retries(tmp_path, server):
    url = server.url("/f", ("status", 500))
    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: HTTP 500 \(after 4 tries\)$"):
        fetch([url], tmp_path / NAME, retries=3)
    assert server.requests["/f"] == 4
    assert listing(tmp_path) == []


def test_dropped_connection_is_retried(tmp_path, server, payload):
    url = server.url("/f", ("hangup",), ("ok", payload))
    assert fetch([url], tmp_path / NAME, payload).read_bytes() == payload
    assert server.requests["/f"] == 2


def test_timeout_is_retried(tmp_path, server, payload):
    url = server.url("/f", ("slow", 1.0, payload), ("ok", payload))
    assert fetch([url], tmp_path / NAME, payload, timeout=0.2).read_bytes() == payload
    assert server.requests["/f"] == 2


def test_redirects_are_followed(tmp_path, server, payload):
    url = server.url("/old", ("redirect", "/new"))
    server.url("/new", ("ok", payload))
    assert fetch([url], tmp_path / NAME, payload).read_bytes() == payload


def test_size_cap_refuses_a_declared_large_body_before_reading_it(tmp_path, server, payload):
    url = server.url("/f", ("ok", payload))
    with pytest.raises(
        DownloadError, match=rf"{re.escape(url)}: Content-Length {len(payload)} is over the "
    ):
        fetch([url], tmp_path / NAME, max_bytes=1000)
    assert listing(tmp_path) == []
    assert server.requests["/f"] == 1  # over the cap is not worth retrying


def test_size_cap_stops_a_body_without_a_length(tmp_path, server, payload):
    url = server.url("/f", ("nolength", payload))
    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: body is over the \d+-byte limit"):
        fetch([url], tmp_path / NAME, max_bytes=len(payload) - 1)
    assert listing(tmp_path) == []
    assert fetch([url], tmp_path / NAME, max_bytes=len(payload)).read_bytes() == payload


def test_size_cap_cuts_off_an_endless_body(tmp_path, server):
    url = server.url("/f", ("endless",))
    started = time.monotonic()
    with pytest.raises(DownloadError, match="body is over the 100000-byte limit"):
        fetch([url], tmp_path / NAME, max_bytes=100_000)
    assert time.monotonic() - started < 10  # stopped at the cap, not at a timeout or never
    assert listing(tmp_path) == []


def test_file_urls_work_and_a_missing_file_moves_on_at_once(tmp_path, payload, caplog):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / NAME).write_bytes(payload)
    missing = (mirror / "nothing.gz").as_uri()
    with caplog.at_level(logging.WARNING, logger="classifier.data.fetch"):
        dest = fetch([missing, (mirror / NAME).as_uri()], tmp_path / "out" / NAME, payload)
    assert dest.read_bytes() == payload
    assert [r.getMessage() for r in caplog.records] == [
        f"{NAME}: {missing}: No such file or directory; trying the next mirror"
    ]


def test_a_failed_download_leaves_the_previous_file_untouched(tmp_path, server, payload):
    dest = tmp_path / NAME
    dest.write_bytes(b"the good old file")
    with pytest.raises(DownloadError):
        fetch([server.url("/f", ("truncate", payload[:1000]))], dest, retries=1)
    with pytest.raises(DownloadError):
        fetch([server.url("/g", ("ok", b"something else"))], dest, payload)
    assert dest.read_bytes() == b"the good old file"
    assert listing(tmp_path) == [NAME]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_interrupted_download_leaves_no_partial_file(tmp_path, server, payload):
    dest = tmp_path / NAME
    dest.write_bytes(b"the good old file")
    url = server.url("/f", ("stall", payload, 3.0))
    seen_at_interrupt = []

    def interrupt(signum, frame):
        seen_at_interrupt.extend(listing(tmp_path))
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            fetch([url], dest, payload, timeout=5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # The server stalls after 1000 bytes: the interrupt lands while the temporary is open.
    assert len(seen_at_interrupt) == 2
    assert seen_at_interrupt[0].startswith(f".{NAME}.tmp-")
    assert dest.read_bytes() == b"the good old file"
    assert listing(tmp_path) == [NAME]


def test_no_network_names_every_url_tried(tmp_path):
    first, second = closed_port_url("/a/f.gz"), closed_port_url("/b/f.gz")
    with pytest.raises(DownloadError) as failure:
        fetch([first, second], tmp_path / NAME, retries=1)
    assert str(failure.value) == (
        f"{NAME}: every mirror failed: "
        f"{first}: Connection refused (after 2 tries); "
        f"{second}: Connection refused (after 2 tries)"
    )
    assert "\n" not in str(failure.value)
    assert listing(tmp_path) == []


def test_unsupported_url_moves_on_to_the_next_mirror(tmp_path, server, payload):
    good = server.url("/f", ("ok", payload))
    dest = fetch(["ftp://127.0.0.1/f", "data/f", good], tmp_path / NAME, payload)
    assert dest.read_bytes() == payload


def test_no_urls_at_all_is_a_download_error(tmp_path):
    with pytest.raises(DownloadError, match=rf"^{re.escape(NAME)}: no URL to download it from"):
        fetch([], tmp_path / NAME)


@pytest.mark.parametrize("sha256", ["abc", "g" * 64])
def test_malformed_expected_checksum_is_refused_before_downloading(tmp_path, server, sha256):
    url = server.url("/f", ("ok", b"x"))
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits"):
        fetch([url], tmp_path / NAME, sha256=sha256)
    assert server.requests["/f"] == 0


def test_progress_bar_names_the_file_when_asked(tmp_path, server, payload, capsys):
    fetch([server.url("/f", ("ok", payload))], tmp_path / NAME, progress=True)
    shown = capsys.readouterr().err
    assert f"{NAME}: 100%" in shown
    assert f"{len(payload) / 1000:.1f}k/{len(payload) / 1000:.1f}k" in shown
    assert ".tmp-" not in shown


@pytest.mark.parametrize("progress", [False, None])
def test_progress_bar_is_hidden_when_not_asked_or_not_on_a_terminal(
    tmp_path, server, payload, capsys, progress
):
    fetch([server.url("/f", ("ok", payload))], tmp_path / NAME, progress=progress)
    assert capsys.readouterr().err == ""
