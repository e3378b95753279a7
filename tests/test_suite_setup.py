"""The suite's own set-up: how its xdist workers share the machine."""

from __future__ import annotations

import os

import pytest

from classifier.sweeps.resources import cpu_count
from tests.helpers import THREAD_ENV, share_the_cores, stage_env


@pytest.mark.parametrize(
    ("workers", "cores", "threads"), [(2, 2, "1"), (1, 2, "2"), (4, 2, "1"), (3, 16, "5")]
)
def test_each_worker_gives_tensorflow_and_blas_its_share_of_the_cores(workers, cores, threads):
    environ: dict[str, str] = {}
    share_the_cores(environ, workers, cores)
    assert environ == dict.fromkeys(THREAD_ENV, threads)


def test_a_thread_count_set_before_is_kept():
    environ = {"OMP_NUM_THREADS": "3", "PATH": "/bin"}
    share_the_cores(environ, 2, 2)
    assert environ == {
        "OMP_NUM_THREADS": "3",
        "PATH": "/bin",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
    }


def test_this_worker_and_the_stages_it_starts_have_a_share():
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        pytest.skip("not an xdist worker: make test and make test-fast run under xdist")
    env = stage_env()
    for name in THREAD_ENV:
        assert 1 <= int(env[name]) <= cpu_count(), name
