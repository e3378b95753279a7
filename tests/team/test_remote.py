"""The team's DVC remote on S3: data, models and experiments one clone pushes, another pulls."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import DVC_REMOTE, S3_KEY_ID, S3_SECRET, Clone, S3Store, run_command

# One worker builds the team (S3, MLflow server, PostgreSQL, two clones) and runs these.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("team")]
EXPERIMENT = "team-two-epochs"


@pytest.fixture(scope="module")
def experiment(alice: Clone, bob: Clone) -> str:
    """Alice runs an experiment and pushes it; Bob pulls it. Returns its name.

    It runs up to train (a new model is what it shares), so it registers no version and
    the registry tests see the same champion in any order; ``--temp`` leaves Alice's
    workspace at the pushed commit.
    """
    alice.run("dvc", "exp", "run", "--temp", "-n", EXPERIMENT, "-S", "train.epochs=2", "train")
    alice.run("dvc", "exp", "push", "origin", EXPERIMENT)
    bob.run("dvc", "exp", "pull", "origin", EXPERIMENT)
    return EXPERIMENT


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cache_path(repo: Path, md5: str) -> Path:
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def cached_outs(repo: Path, lock_text: str | None = None) -> dict[str, str]:
    """``{path: md5}`` from dvc.lock of every output that DVC caches (not ``cache: false``)."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    uncached = {
        path
        for stage in pipeline.values()
        for out in stage.get("outs", []) + stage.get("metrics", [])
        if isinstance(out, dict)
        for path, options in out.items()
        if options.get("cache") is False
    }
    lock = yaml.safe_load(lock_text if lock_text else (repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"] not in uncached
    }


def dir_manifest(repo: Path, md5: str) -> dict[str, str]:
    """``{relative path: md5}`` of the files of a cached directory, from its ``.dir`` object."""
    entries = json.loads(cache_path(repo, md5).read_text())
    return {entry["relpath"]: entry["md5"] for entry in entries}


def test_the_remote_is_in_git_and_its_credentials_are_not(alice, origin, experiment):
    committed = run_command(origin, "git", "show", "main:.dvc/config", env=alice.env).stdout
    assert DVC_REMOTE in committed
    assert "endpointurl" in committed
    for secret in (S3_KEY_ID, S3_SECRET, "access_key", "secret"):
        assert secret not in committed
    # Nowhere in the shared history, experiments included.
    revisions = run_command(origin, "git", "rev-list", "--all", env=alice.env).stdout.split()
    assert len(revisions) >= 3  # project, one epoch, the experiment
    found = run_command(
        origin,
        "git",
        "grep",
        "-F",
        "-e",
        S3_SECRET,
        "-e",
        S3_KEY_ID,
        *revisions,
        env=alice.env,
        check=False,
    )
    assert found.returncode == 1, found.stdout  # 1: no match
    local = (alice.path / ".dvc" / "config.local").read_text()
    assert S3_SECRET in local
    assert alice.run("git", "check-ignore", ".dvc/config.local").returncode == 0


def test_push_uploads_every_cached_output_to_the_bucket(alice, s3: S3Store):
    keys = s3.keys("dvc/")
    outs = cached_outs(alice.path)
    assert {"data/raw", "data/prepared", "models/model.keras", "models/formats"} <= set(outs)
    for path, md5 in outs.items():
        assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys, path
        if md5.endswith(".dir"):
            for relpath, file_md5 in dir_manifest(alice.path, md5).items():
                assert f"dvc/files/md5/{file_md5[:2]}/{file_md5[2:]}" in keys, f"{path}/{relpath}"


def test_pull_in_a_fresh_clone_gets_byte_identical_data_and_models(alice, bob):
    assert (bob.path / "dvc.lock").read_text() == (alice.path / "dvc.lock").read_text()
    for path, md5 in cached_outs(bob.path).items():
        if md5.endswith(".dir"):
            expected = dir_manifest(bob.path, md5)
            pulled = {
                file.relative_to(bob.path / path).as_posix(): md5_of(file)
                for file in (bob.path / path).rglob("*")
                if file.is_file()
            }
            assert pulled == expected, path
        else:
            assert md5_of(bob.path / path) == md5, path
    model = "models/model.keras"
    assert (bob.path / model).read_bytes() == (alice.path / model).read_bytes()
    # DVC agrees: every stage is up to date, nothing to run.
    assert json.loads(bob.out("dvc", "status", "--json")) == {}


def test_exp_push_and_pull_share_the_experiment_and_its_model(alice, bob, experiment):
    remote_refs = run_command(
        bob.path, "git", "ls-remote", "origin", "refs/exps/*", env=bob.env
    ).stdout
    assert remote_refs.rstrip().endswith(f"/{experiment}")

    shown = json.loads(bob.out("dvc", "exp", "show", "--json"))
    revs = {
        rev["name"]: rev
        for baseline in shown
        for group in baseline.get("experiments") or []
        for rev in group["revs"]
    }
    assert experiment in revs
    params = revs[experiment]["data"]["params"]["params.yaml"]["data"]
    assert params["train"]["epochs"] == 2

    # The experiment's own model came with it, from the remote into Bob's cache.
    lock = bob.out("git", "show", f"{revs[experiment]['rev']}:dvc.lock")
    model_md5 = cached_outs(bob.path, lock)["models/model.keras"]
    assert model_md5 != cached_outs(bob.path)["models/model.keras"]  # two epochs, not one
    assert md5_of(cache_path(bob.path, model_md5)) == model_md5
