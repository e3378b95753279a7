"""Two `dvc exp run` in one workspace: the second never trains the first with its params.

The case found by hand: after one completed run, `dvc exp run -S train.seed=8 &`, then
`dvc exp run -S train.seed=9` four seconds later. The second fails on DVC's lock but has
already written `seed: 9` into params.yaml; the first run's early stages are skipped as
unchanged, so its train stage was the first to look, saw seed 9, and trained with it.
Here the train stage is the project's guard around a stand-in body whose start-up (as
importing TensorFlow takes seconds) lasts until the test says go: the second run writes
its params in that window whatever the machine's load.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT_ROOT, init_git, run_ok, user_env

pytestmark = pytest.mark.slow

TRAIN = """\
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from classifier.cli import run_stage
deadline = time.monotonic() + 300
while not Path("go").exists():  # start-up (TensorFlow's import): the second run writes now
    assert time.monotonic() < deadline
    time.sleep(0.05)

def body():
    import yaml
    seed = yaml.safe_load(Path("params.yaml").read_text())["train"]["seed"]
    Path("trained_with.txt").write_text(f"{{seed}}\\n")

sys.exit(run_stage("train", body, Path("params.yaml")))
"""


def two_stage_project(repo: Path) -> Path:
    repo.mkdir()
    (repo / "train.py").write_text(TRAIN.format(root=str(PROJECT_ROOT)))
    (repo / "params.yaml").write_text("train:\n  seed: 1\n")
    stages = {
        "prepare": {"cmd": "echo data > data.txt", "outs": ["data.txt"]},
        "train": {
            "cmd": "python train.py",
            "deps": ["data.txt", "train.py"],
            "params": ["train"],
            "outs": ["trained_with.txt"],
        },
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    init_git(repo)
    run_ok(repo, "dvc", "init", "-q")
    (repo / "go").touch()
    run_ok(repo, "dvc", "repro", "-q")
    (repo / "go").unlink()
    run_ok(repo, "git", "add", "-A")
    run_ok(repo, "git", "commit", "-qm", "first run")
    return repo


def test_a_second_exp_run_never_makes_the_first_train_with_its_params(tmp_path):
    repo = two_stage_project(tmp_path / "project")
    first = subprocess.Popen(
        ["dvc", "exp", "run", "-S", "train.seed=8"],
        cwd=repo,
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in first.stdout:  # its prepare stage was skipped; its train stage is starting
        seen.append(line)
        if "Running stage 'train'" in line:
            break
    else:
        pytest.fail(f"the first run never reached its train stage:\n{''.join(seen)}")
    second = subprocess.run(
        ["dvc", "exp", "run", "-S", "train.seed=9"],
        cwd=repo,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    (repo / "go").touch()
    output, _ = first.communicate(timeout=300)
    output = "".join(seen) + output
    assert second.returncode != 0
    assert first.returncode != 0, output
    assert (
        "train: error: params.yaml changed since this `dvc exp run` started: "
        "train.seed is 9, not 8." in output
    ), output
    assert (repo / "trained_with.txt").read_text() == "1\n"  # the first run's output, kept
