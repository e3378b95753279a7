"""A team's set-up on 127.0.0.1: S3 storage, MLflow servers with auth, a shared git remote.

Built once per session, with tools/team_up.py's functions, the way a team would use it:

- an S3 store (moto's server mode) with one bucket: the DVC remote under ``dvc/`` and the
  MLflow server's artifacts under ``mlartifacts/``;
- an MLflow server with basic auth, a PostgreSQL database (sqlite where PostgreSQL is not
  installed) and proxied artifacts; users
  ``alice`` and ``bob`` (everyone may read by default), and the registered model, which
  the admin created and alice may add versions to;
- a bare git repository as ``origin``; Alice's clone ran ``dvc repro`` logging to the
  server as alice, then ``dvc push`` and ``git push``; Bob's is a ``git clone`` of origin
  that ran ``dvc pull``.

Clients get no S3 credentials for MLflow: only the server has them. DVC gets them from
``.dvc/config.local`` (Alice) or the environment (Bob). Every server runs under
classifier/processes.py and is stopped, with its whole process group, when the session
ends, failed or not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from classifier.processes import ProcessGroup
from tests.helpers import (
    ADMIN_PASSWORD,
    ARTIFACTS,
    BUCKET,
    DVC_REMOTE,
    MODEL_NAME,
    S3_KEY_ID,
    S3_SECRET,
    USERS,
    Clone,
    S3Store,
    TrackingServer,
    base_env,
    free_port,
    new_project,
    postgres_bin,
    postgres_driver,
    postgres_missing,
    run_command,
    set_git_user,
)
from tools import team_up


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Store]:
    server, endpoint = team_up.start_s3()
    try:
        team_up.create_bucket(endpoint, BUCKET, S3_KEY_ID, S3_SECRET)
        yield S3Store(endpoint, BUCKET)
    finally:
        server.stop()


@contextmanager
def tracking_server(workdir: Path, backend_store_uri: str, s3: S3Store) -> Iterator[TrackingServer]:
    """An MLflow server with basic auth, users alice and bob, artifacts proxied to ``s3``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth_config = team_up.write_auth_config(workdir / "basic_auth.ini", workdir / "auth.db", "READ")
    server = team_up.start_tracking_server(
        workdir,
        backend_store_uri,
        ARTIFACTS,
        port,
        team_up.s3_environment(s3.endpoint, S3_KEY_ID, S3_SECRET),
        ADMIN_PASSWORD,
        auth_config,
    )
    try:
        team_up.wait_until_healthy(url, server)
        for user, password in USERS.items():
            team_up.create_user(url, ADMIN_PASSWORD, user, password)
        # The admin's set-up step: the team's model, which alice may add versions to. Needed
        # until classifier/tracking/registry.py reads MLflow's 403 for a model that does not
        # exist yet as "no champion"
        # (test_a_user_finds_no_champion_of_a_model_nobody_registered_yet).
        team_up.create_registered_model(url, ADMIN_PASSWORD, MODEL_NAME, editors=["alice"])
        yield TrackingServer(url, workdir, backend_store_uri)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(
    request: pytest.FixtureRequest, s3: S3Store, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrackingServer]:
    """The team's MLflow server: on PostgreSQL where it can run here, else on sqlite."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    if postgres_missing() is None:
        database = request.getfixturevalue("postgres")
    else:
        database = f"sqlite:///{workdir / 'server.db'}"
    with tracking_server(workdir, database, s3) as running:
        yield running


@pytest.fixture(scope="session")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The team's git remote: a bare repository."""
    path = tmp_path_factory.mktemp("origin") / "project.git"
    run_command(path.parent, "git", "init", "-q", "--bare", "-b", "main", str(path), env=base_env())
    return path


@pytest.fixture(scope="session")
def alice(
    s3: S3Store, server: TrackingServer, origin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Clone:
    """Alice's clone: the remote configured, `dvc repro` logged to the server, all pushed."""
    clone = new_project(tmp_path_factory.mktemp("alice") / "project", server, "alice")
    # The remote's address is shared, in git; its credentials only in config.local.
    clone.run("dvc", "remote", "add", "-d", "storage", DVC_REMOTE)
    clone.run("dvc", "remote", "modify", "storage", "endpointurl", s3.endpoint)
    clone.run("dvc", "remote", "modify", "--local", "storage", "access_key_id", S3_KEY_ID)
    clone.run("dvc", "remote", "modify", "--local", "storage", "secret_access_key", S3_SECRET)
    clone.run("git", "add", "-A")
    clone.run("git", "commit", "-qm", "project, with the team's DVC remote")
    clone.run("git", "remote", "add", "origin", str(origin))

    clone.run("dvc", "repro")
    clone.run("git", "add", "-A")
    clone.run("git", "commit", "-qm", "one epoch")
    clone.run("dvc", "push")
    clone.run("git", "push", "-q", "origin", "main")
    return clone


@pytest.fixture(scope="session")
def bob(alice: Clone, server: TrackingServer, origin: Path, tmp_path_factory) -> Clone:
    """Bob's clone of origin after `dvc pull`, S3 credentials from his environment."""
    path = tmp_path_factory.mktemp("bob") / "project"
    run_command(path.parent, "git", "clone", "-q", str(origin), str(path), env=base_env())
    clone = Clone(
        path,
        base_env(**server.env("bob"), AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET),
    )
    set_git_user(clone, "bob")
    clone.run("dvc", "pull")
    return clone


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own on a free port; yields a database URI for MLflow."""
    missing = postgres_missing()
    if missing is not None:
        pytest.skip(missing)
    # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; name the driver that is installed.
    driver, bin_dir = postgres_driver(), postgres_bin()
    # PostgreSQL refuses to run as root; its own user must reach the folder, and pytest's
    # temporary folders are private to root.
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="team-postgres-"))
    password = team_up.generated_password()
    (root / "pwfile").write_text(password)
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pwfile", "postgres")
    env = base_env(PGPASSWORD=password)
    port = free_port()
    postmaster = None
    try:
        run_command(
            root,
            *as_postgres,
            str(bin_dir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            "mlflow",
            f"--pwfile={root / 'pwfile'}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            env=env,
        )
        command = [
            *as_postgres,
            str(bin_dir / "postgres"),
            *("-D", str(root / "data"), "-p", str(port), "-k", str(root)),
            *("-c", "listen_addresses=127.0.0.1"),
        ]
        postmaster = ProcessGroup.start(
            "PostgreSQL", command, env=env, log_path=root / "postgres.log"
        )
        address = ["-h", "127.0.0.1", "-p", str(port), "-U", "mlflow"]

        def ready() -> bool:
            isready = [str(bin_dir / "pg_isready"), *address]
            return run_command(root, *isready, env=env, check=False).returncode == 0

        postmaster.wait_until(ready, timeout=60)
        run_command(root, str(bin_dir / "createdb"), *address, "mlflow", env=env)
        yield f"postgresql+{driver}://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        # SIGINT first: PostgreSQL's fast shutdown, which also ends its backends (each runs
        # in a session of its own, out of reach of a signal to the group).
        if postmaster is not None:
            postmaster.stop()
        shutil.rmtree(root, ignore_errors=True)
