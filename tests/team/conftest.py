"""A team's set-up on 127.0.0.1: S3 storage, MLflow servers with auth, a shared git remote.

Built once per session, with scripts/team_up.py's functions, the way a team would use it:

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
``.dvc/config.local`` (Alice) or the environment (Bob). Every server is stopped, with its
whole process group, when the session ends, failed or not.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts import team_up
from tests.conftest import free_port
from tests.test_pipeline import copy_project, set_params

BUCKET = "team-bucket"
DVC_REMOTE = f"s3://{BUCKET}/dvc"
ARTIFACTS = f"s3://{BUCKET}/mlartifacts"
# moto takes any credentials; these stand for secrets that must never reach git.
S3_KEY_ID = "team-test-key-id"
S3_SECRET = "team-test-secret-do-not-commit"
USERS = {"alice": "alice-password-0123", "bob": "bob-password-4567"}
ADMIN_PASSWORD = team_up.generated_password()
EPOCHS = 1
MODEL_NAME = "digits-cnn"


def base_env(**extra: str) -> dict[str, str]:
    """A user's shell: this environment without MLflow, AWS or DVC settings, the venv first."""
    env = team_up.clean_environment()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "true"
    env.update(extra)
    return env


def run(
    cwd: Path, *command: str, env: dict[str, str], check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``cwd``; with ``check``, fail the test showing its output's end."""
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        output = (done.stdout + done.stderr)[-4000:]
        assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output}"
    return done


@dataclass(frozen=True)
class S3Store:
    endpoint: str
    bucket: str
    key_id: str = S3_KEY_ID
    secret: str = field(default=S3_SECRET, repr=False)

    def keys(self, prefix: str = "") -> set[str]:
        """Every object key under ``prefix`` in the bucket."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}


@dataclass(frozen=True)
class TrackingServer:
    url: str
    workdir: Path
    backend_store_uri: str

    def env(self, user: str, password: str | None = None) -> dict[str, str]:
        """What a client sets to log to this server as ``user``: no S3 credentials."""
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": USERS[user] if password is None else password,
        }

    @contextmanager
    def client(self, user: str) -> Iterator[object]:
        """An ``MlflowClient`` of this server, authenticated as ``user`` inside the block."""
        import mlflow

        with pytest.MonkeyPatch.context() as patch:
            for key, value in self.env(user).items():
                patch.setenv(key, value)
            yield mlflow.MlflowClient(tracking_uri=self.url)


@dataclass(frozen=True)
class Clone:
    """A working copy of the project and the environment its user runs commands in."""

    path: Path
    env: dict[str, str] = field(repr=False)

    def run(self, *command: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        return run(self.path, *command, env={**self.env, **env}, check=check)

    def out(self, *command: str) -> str:
        return self.run(*command).stdout


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
    process = team_up.start_tracking_server(
        workdir,
        backend_store_uri,
        ARTIFACTS,
        port,
        team_up.s3_environment(s3.endpoint, S3_KEY_ID, S3_SECRET),
        ADMIN_PASSWORD,
        auth_config,
    )
    try:
        team_up.wait_until_healthy(url, process, workdir / "mlflow-server.log")
        for user, password in USERS.items():
            team_up.create_user(url, ADMIN_PASSWORD, user, password)
        # The admin's set-up step: the team's model, which alice may add versions to. Needed
        # until stages/tracking.py reads MLflow's 403 for a model that does not exist yet as
        # "no champion" (test_a_user_finds_no_champion_of_a_model_nobody_registered_yet).
        team_up.create_registered_model(url, ADMIN_PASSWORD, MODEL_NAME, editors=["alice"])
        yield TrackingServer(url, workdir, backend_store_uri)
    finally:
        team_up.stop_process_group(process)


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


def new_project(path: Path, server: TrackingServer, user: str) -> Clone:
    """The project in a new git repository, one epoch, logging to ``server`` as ``user``."""
    path.mkdir(parents=True, exist_ok=True)
    copy_project(path)
    set_params(path, epochs=EPOCHS)
    # One epoch is not the real thing: let any model become champion and pass parity.
    set_params(path, "export", accuracy_floor=0.0, int8_max_accuracy_drop=1.0)
    clone = Clone(path, base_env(**server.env(user)))
    clone.run("git", "init", "-q", "-b", "main")
    set_git_user(clone, user)
    return clone


def set_git_user(clone: Clone, user: str) -> None:
    clone.run("git", "config", "user.name", user)
    clone.run("git", "config", "user.email", f"{user}@example.invalid")


@pytest.fixture(scope="session")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The team's git remote: a bare repository."""
    path = tmp_path_factory.mktemp("origin") / "project.git"
    run(path.parent, "git", "init", "-q", "--bare", "-b", "main", str(path), env=base_env())
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
    run(path.parent, "git", "clone", "-q", str(origin), str(path), env=base_env())
    clone = Clone(
        path,
        base_env(**server.env("bob"), AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET),
    )
    set_git_user(clone, "bob")
    clone.run("dvc", "pull")
    return clone


# --- PostgreSQL ---------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_driver() -> str | None:
    """The PostgreSQL driver installed for SQLAlchemy (uv.lock has psycopg 3)."""
    return next((name for name in ("psycopg", "psycopg2") if importlib.util.find_spec(name)), None)


def postgres_missing() -> str | None:
    """Why no PostgreSQL server can be started here; None if one can."""
    if postgres_driver() is None:
        return "no PostgreSQL driver (psycopg or psycopg2) is installed: uv sync"
    if postgres_bin() is None:
        return "PostgreSQL is not installed (no initdb): apt-get install postgresql"
    return None


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
    process = None
    try:
        run(
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
        with (root / "postgres.log").open("ab") as log:
            process = subprocess.Popen(
                [
                    *as_postgres,
                    str(bin_dir / "postgres"),
                    "-D",
                    str(root / "data"),
                    "-p",
                    str(port),
                    "-k",
                    str(root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        address = ["-h", "127.0.0.1", "-p", str(port), "-U", "mlflow"]
        deadline = time.monotonic() + 60
        while run(root, str(bin_dir / "pg_isready"), *address, env=env, check=False).returncode:
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (root / "postgres.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"PostgreSQL did not start:\n{log_text}")
            time.sleep(0.5)
        run(root, str(bin_dir / "createdb"), *address, "mlflow", env=env)
        yield f"postgresql+{driver}://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        if process is not None:
            team_up.stop_process_group(process)
        shutil.rmtree(root, ignore_errors=True)
