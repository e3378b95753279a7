"""Start a team's shared services on this machine to try them out; Ctrl-C stops them.

    python -m tools.team_up        # or: make team-up

What runs, all on 127.0.0.1, with its data and logs under ``.team/``:

- an S3-compatible object store (moto in server mode) with one bucket: the DVC remote
  (``s3://team/dvc``) and MLflow's artifact store (``s3://team/mlartifacts``);
- an MLflow tracking server with basic auth (an admin and one user, with generated
  passwords) and a sqlite database, its artifacts proxied to the bucket, so clients need
  no S3 credentials of their own.

It prints what to paste into a shell in the project (also written to ``.team/env.sh``).
moto keeps objects in memory, so every start begins empty: the databases are removed too.
docs/team.md says what a real deployment changes. The functions here are also what the
tests in tests/team start their servers with; every process is started and stopped by
classifier/processes.py.
"""

from __future__ import annotations

import argparse
import configparser
import getpass
import json
import logging
import os
import secrets
import signal
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from classifier.processes import ProcessError, ProcessGroup

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
BUCKET = "team"
DVC_PREFIX = "dvc"
ARTIFACTS_PREFIX = "mlartifacts"
ADMIN_USERNAME = "admin"
STARTUP_SECONDS = 180  # an MLflow server can take a minute or more to start on 2 busy cores
# Settings a server must not inherit from the shell that starts it: they name other stores.
PRIVATE_PREFIXES = ("MLFLOW_", "AWS_", "DVC_")
# What main() writes under --dir, and removes when it starts again.
SERVER_LOG = "mlflow-server.log"
TEAM_FILES = ("basic_auth.ini", "auth.db", "mlflow.db", "env.sh", SERVER_LOG)


class TeamUpError(RuntimeError):
    """A service did not start."""


def generated_password() -> str:
    """A random password that MLflow's basic auth accepts (12 characters or more)."""
    return secrets.token_urlsafe(18)


def check_port_free(port: int, option: str) -> None:
    """Raise if something listens on ``port`` already (it would answer in our servers' place)."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            raise TeamUpError(f"port {port} is in use; choose another with {option}") from None


def start_s3(port: int = 0) -> tuple[Any, str]:
    """moto's S3 server on 127.0.0.1 in a thread of this process; returns it and its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    host, bound_port = server.get_host_and_port()
    return server, f"http://{host}:{bound_port}"


def s3_environment(endpoint: str, key_id: str, secret: str) -> dict[str, str]:
    """The variables a server process needs to reach the S3 store (clients never need them)."""
    return {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


def create_bucket(endpoint: str, bucket: str, key_id: str, secret: str) -> None:
    """Create ``bucket`` on the S3 store at ``endpoint``."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)


def write_auth_config(path: Path, auth_database: Path, default_permission: str) -> Path:
    """Write MLflow's basic-auth config: where users live, what everyone may do by default.

    The admin password is not in it: the server reads it from ``MLFLOW_AUTH_ADMIN_PASSWORD``
    on its first start (MLflow ships no default).
    """
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": default_permission,
        "database_uri": f"sqlite:///{auth_database.resolve()}",
        "admin_username": ADMIN_USERNAME,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        config.write(file)
    return path


def clean_environment() -> dict[str, str]:
    """This process's environment without MLflow, AWS or DVC settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_PREFIXES)}


def start_tracking_server(
    workdir: Path,
    backend_store_uri: str,
    artifacts_destination: str,
    port: int,
    s3_env: Mapping[str, str],
    admin_password: str,
    auth_config: Path,
    workers: int = 1,
) -> ProcessGroup:
    """``mlflow server`` with basic auth, in its own process group; log in ``workdir``.

    Only this process gets the S3 credentials: clients upload and download artifacts
    through the server (``mlflow-artifacts:/``), which writes them to
    ``artifacts_destination``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = clean_environment()
    env.update(s3_env)
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(auth_config),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        # Signs the auth pages' CSRF tokens; several servers behind a proxy must share it.
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
        # No background job runner (GenAI jobs): one process less on a small machine.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    return ProcessGroup.start(
        "MLflow server", command, cwd=workdir, env=env, log_path=workdir / SERVER_LOG
    )


def wait_until_healthy(url: str, server: ProcessGroup, timeout: float = STARTUP_SECONDS) -> None:
    """Wait until ``url``/health answers; raise with the log's end if the server exits first."""
    try:
        server.wait_for_http(f"{url}/health", timeout)
    except ProcessError as error:
        raise TeamUpError(f"{url}: {error}") from None


def admin_request(url: str, admin_password: str, path: str, body: Mapping[str, str]) -> None:
    """POST ``body`` to the server's REST API at ``path`` as the admin."""
    token = b64encode(f"{ADMIN_USERNAME}:{admin_password}".encode()).decode()
    request = urllib.request.Request(
        f"{url}/api/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30):
            pass
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")[:300]
        raise TeamUpError(f"{url}/api/{path}: HTTP {error.code} {text}") from None


def create_user(url: str, admin_password: str, username: str, password: str) -> None:
    """Create an MLflow user."""
    body = {"username": username, "password": password}
    admin_request(url, admin_password, "2.0/mlflow/users/create", body)


def create_registered_model(
    url: str, admin_password: str, name: str, editors: Sequence[str] = ()
) -> None:
    """Register the model name ``name`` as the admin; let ``editors`` add versions and aliases.

    Needed before a user who is not an admin first exports: MLflow's basic auth answers
    403, not 404, when asked for an alias of a model that does not exist yet, and
    classifier/tracking/registry.py only takes a 404 for "no champion yet".
    """
    admin_request(url, admin_password, "2.0/mlflow/registered-models/create", {"name": name})
    for username in editors:
        grant = {
            "username": username,
            "resource_type": "registered_model",
            "resource_id": name,
            "permission": "EDIT",
        }
        admin_request(url, admin_password, "3.0/mlflow/users/permissions/grant", grant)


def exports(
    mlflow_url: str, username: str, password: str, s3_endpoint: str, key_id: str, secret: str
) -> str:
    """What a user pastes into a shell in the project to use the services."""
    remote = f"s3://{BUCKET}/{DVC_PREFIX}"
    return f"""\
# MLflow: the pipeline logs runs and registers models on the server, as {username}
export MLFLOW_TRACKING_URI={mlflow_url}
export MLFLOW_TRACKING_USERNAME={username}
export MLFLOW_TRACKING_PASSWORD={password}
# DVC: the shared remote, all in .dvc/config.local (git ignores it), so nothing to commit
dvc remote add --local --force -d team {remote}
dvc remote modify --local team endpointurl {s3_endpoint}
dvc remote modify --local team access_key_id {key_id}
dvc remote modify --local team secret_access_key {secret}
"""


def model_name(params_path: Path) -> str:
    """export.model_name of the project's params.yaml."""
    import yaml

    return yaml.safe_load(params_path.read_text())["export"]["model_name"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.team_up",
        description="Start an S3 store and an MLflow server with auth on 127.0.0.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dir", type=Path, default=PROJECT_ROOT / ".team", help="data and logs")
    parser.add_argument("--mlflow-port", type=int, default=5050, help="MLflow server port")
    parser.add_argument("--s3-port", type=int, default=9000, help="S3 server port")
    parser.add_argument("--user", default=getpass.getuser(), help="the MLflow user to create")
    parser.add_argument(
        "--default-permission",
        default="EDIT",
        choices=["READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"],
        help="what every user may do to others' experiments and models",
    )
    parser.add_argument(
        "--model-name",
        default=model_name(PROJECT_ROOT / "params.yaml"),
        help="the registered model to create (export.model_name of params.yaml)",
    )
    parser.add_argument(
        "--backend-store-uri",
        help="MLflow's database, e.g. postgresql+psycopg2://user:pw@host/db; None: sqlite in --dir",
    )
    return parser.parse_args(argv)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_on_ctrl_c_and_sigterm() -> None:
    """Raise KeyboardInterrupt on SIGINT and SIGTERM, so ``main`` stops everything.

    Even where SIGINT came in ignored: a shell starts a background job (`make test &`, many
    CI runners) with SIGINT ignored, and Python then leaves it ignored.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in TEAM_FILES:  # the objects they refer to died with the last moto
        (root / name).unlink(missing_ok=True)
    _stop_on_ctrl_c_and_sigterm()

    key_id, secret = "team-up", generated_password()
    admin_password, user_password = generated_password(), generated_password()
    s3_server = server = None
    try:
        check_port_free(args.s3_port, "--s3-port")
        check_port_free(args.mlflow_port, "--mlflow-port")
        s3_server, s3_endpoint = start_s3(args.s3_port)
        create_bucket(s3_endpoint, BUCKET, key_id, secret)
        print(f"S3 store       {s3_endpoint}  bucket {BUCKET}", flush=True)

        mlflow_url = f"http://{HOST}:{args.mlflow_port}"
        auth_config = write_auth_config(
            root / "basic_auth.ini", root / "auth.db", args.default_permission
        )
        server = start_tracking_server(
            root,
            args.backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
            f"s3://{BUCKET}/{ARTIFACTS_PREFIX}",
            args.mlflow_port,
            s3_environment(s3_endpoint, key_id, secret),
            admin_password,
            auth_config,
        )
        print(f"MLflow server  {mlflow_url}  starting (log: {server.log_path})", flush=True)
        wait_until_healthy(mlflow_url, server)
        create_user(mlflow_url, admin_password, args.user, user_password)
        create_registered_model(mlflow_url, admin_password, args.model_name)

        pasted = exports(mlflow_url, args.user, user_password, s3_endpoint, key_id, secret)
        env_file = root / "env.sh"
        env_file.touch(mode=0o600)
        env_file.write_text(pasted)
        print(f"MLflow admin   {ADMIN_USERNAME} / {admin_password}  (users: {mlflow_url}/signup)")
        print(f"\nReady. In the project, paste this (or `source {env_file}`):\n")
        print(pasted)
        print("Ctrl-C stops everything.", flush=True)
        server.process.wait()
        print(f"MLflow server exited with code {server.process.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
        return 0
    except (TeamUpError, OSError) as error:
        print(f"team-up: error: {error}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        if s3_server is not None:
            s3_server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
