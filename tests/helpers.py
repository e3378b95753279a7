"""Helpers every test module may import: one place, not conftest.py or each other.

Fixtures live in the conftest.py files and use these; tests import them with
``from tests.helpers import ...``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import importlib.util
import itertools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from classifier.config import Params, parse_params
from classifier.data.sources import IDX_FILES
from tools import team_up

# --- The project and its params -----------------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parents[1]


TEST_EXPERIMENT = "tests"


TRAIN_EPOCHS = 3


DVC_EXPERIMENT = "test-exp-name"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def project_params(**overrides: dict[str, Any]) -> Params:
    """The project's params.yaml with some keys of some sections replaced, validated."""
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        raw[section].update(values)
    return parse_params(raw, "params.yaml (test overrides)")


def readme_photo_example() -> list[str]:
    """The `dvc exp run` command of README.md's photo example, as its arguments."""
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("<!-- photo-example")[1].split("```bash\n")[1].split("```")[0]
    return shlex.split(block.replace("\\\n", " "))


def readme_photo_settings() -> dict[str, object]:
    """The ``section.key: value`` settings (``-S``) of README.md's photo example."""
    command = readme_photo_example()
    return {
        key: yaml.safe_load(value)
        for flag, setting in itertools.pairwise(command)
        if flag == "-S"
        for key, _, value in [setting.partition("=")]
    }


def sqlite_uri(directory: Path) -> str:
    return f"sqlite:///{directory / 'mlflow.db'}"


_EMPTY_STORES: dict[int, Path] = {}


def fresh_store(directory: Path) -> str:
    """A new, empty MLflow sqlite store in ``directory``; returns its URI.

    MLflow takes about 3 s of CPU to create a store (its schema migrations, one by one).
    So each test process has MLflow create one, empty, and every fresh store is a copy of
    that file: the same schema and rows as a store MLflow made there, in milliseconds.
    """
    template = _EMPTY_STORES.get(os.getpid())
    if template is None:
        import atexit
        import tempfile

        import mlflow

        folder = tempfile.mkdtemp(prefix="empty-mlflow-store-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # left in /tmp otherwise
        template = Path(folder) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _EMPTY_STORES[os.getpid()] = template
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, directory / "mlflow.db")
    return sqlite_uri(directory)


# TensorFlow's thread pools size themselves from these when the code sets nothing; numpy's
# BLAS reads the last one.
THREAD_ENV = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def share_the_cores(environ: MutableMapping[str, str], workers: int, cores: int) -> None:
    """Give TensorFlow and BLAS ``cores // workers`` threads (at least one) in ``environ``,
    as a sweep gives its trials (classifier/sweeps/resources.py); values set are kept.

    Two xdist workers on two cores would otherwise each run two busy TensorFlow threads,
    and so would every stage they start, spin-waiting for each other: a fresh clone's
    suite used 2,650 to 2,790 CPU-seconds so, 2,445 with the share.
    """
    from classifier.sweeps.resources import plan_share

    threads = str(plan_share(workers, cores, ()).threads)
    for name in THREAD_ENV:
        environ.setdefault(name, threads)


def write_raw_pool(raw_dir: Path, image_set) -> None:
    """Write ``image_set`` as the download stage's pool layout (what digits produce)."""
    from classifier.atomic import write_json
    from classifier.data.dataset import write_image_set
    from classifier.data.raw import SOURCE_FILE

    write_image_set(raw_dir / "pool", image_set)
    write_json(raw_dir / SOURCE_FILE, {"source": "test", "layout": "pool"})


def train_args(data: Path, out: Path, params: Path, models: Path | None = None) -> list[str]:
    """The train stage's arguments: every output under ``out``, the model in ``models``."""
    models = out if models is None else models
    return [
        "--params",
        str(params),
        "--data",
        str(data),
        "--model",
        str(models / "model.keras"),
        "--history",
        str(out / "history.csv"),
        "--metrics",
        str(out / "train.json"),
        "--run-info",
        str(out / "run.json"),
        "--data-report",
        str(out / "none.md"),
        "--checkpoint",
        str(models / "checkpoint"),
    ]


def train_command(data: Path, out: Path, params: Path) -> list[str]:
    """``python -m stages.train`` on ``data``, with every output under ``out``."""
    return [sys.executable, "-m", "stages.train", *train_args(data, out, params)]


@dataclass(frozen=True)
class TrainedRun:
    """A model trained once per session by the real train stage, and where it wrote."""

    params: Params
    store_uri: str
    data_dir: Path
    model_path: Path
    history_path: Path
    metrics_path: Path
    run_info_path: Path
    result: Any


def make_image_folder(
    root: Path, per_class: int = 6, broken: bool = True, seed: int = 0, bright: str = "side"
) -> dict[str, list[str]]:
    """Two classes of images as people have them: mixed formats, modes and sizes.

    Cats are bright on the left, dogs bright on the right, so a CNN can learn them. With
    ``broken``, add a truncated JPEG, an empty file and a text file. Returns file names
    per class folder.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    kinds = [
        ("jpg", "RGB", {"quality": 90}),
        ("png", "L", {}),
        ("png", "RGBA", {}),
        ("gif", "P", {}),
        ("bmp", "RGB", {}),
        ("webp", "RGB", {}),
        ("png", "I;16", {}),
    ]
    written: dict[str, list[str]] = {}
    for label, name in enumerate(("cats", "dogs")):
        folder = root / name
        folder.mkdir(parents=True)
        written[name] = []
        for index in range(per_class):
            extension, mode, options = kinds[index % len(kinds)]
            width, height = (int(v) for v in rng.integers(24, 160, size=2))
            pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
            if bright == "side":  # left or right: a horizontal flip swaps the classes
                half = slice(0, width // 2) if label == 0 else slice(width // 2, width)
                pixels[:, half] += 180
            else:  # top or bottom: the classes survive a horizontal flip
                half = slice(0, height // 2) if label == 0 else slice(height // 2, height)
                pixels[half] += 180
            picture = Image.fromarray(pixels, "RGB")
            if mode == "I;16":
                gray = np.asarray(picture.convert("L")).astype(np.uint16)
                picture = Image.fromarray(gray * 257)
            elif mode != "RGB":
                picture = picture.convert(mode)
            file_name = f"{name}_{index:03d}.{extension}"
            picture.save(folder / file_name, **options)
            written[name].append(file_name)
    if broken:
        good = root / "cats" / written["cats"][0]
        (root / "cats" / "truncated.jpg").write_bytes(good.read_bytes()[:300])
        (root / "dogs" / "empty.png").write_bytes(b"")
        (root / "dogs" / "notes.txt").write_text("not a picture")
        written["cats"].append("truncated.jpg")
        written["dogs"] += ["empty.png", "notes.txt"]
    (root / ".DS_Store").write_bytes(b"\0\0junk")
    (root / "cats" / ".hidden.jpg").write_bytes(b"junk")
    return written


# --- Stages as a user runs them, and what they leave --------------------------------------

# Keep stderr to what the stage itself says: no INFO logs, no TensorFlow start-up chatter.
QUIET = {"LOG_LEVEL": "ERROR", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}


# What a stage leaves beside an output while writing it (stages/atomic.py and friends).
TEMPORARY_MARKERS = (".tmp-", ".old-", ".work-", ".downloads", ".archive-")


def stage_env(store: str | None = None, **extra: str) -> dict[str, str]:
    """This environment without MLflow/DVC settings, quiet, logging to ``store`` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(QUIET)
    if store is not None:
        env.update(MLFLOW_TRACKING_URI=store, MLFLOW_EXPERIMENT_NAME=TEST_EXPERIMENT)
    env.update(extra)
    return env


# The entry points in tools/ rather than stages/.
TOOLS = ("compare", "predict", "team_up")


def run_cli(
    stage: str,
    *args: object,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    **popen: Any,
) -> subprocess.CompletedProcess[str]:
    """``python -m stages.<stage> ARGS`` (or ``tools.<name>``) from the project root, output
    captured."""
    package = "tools" if stage in TOOLS else "stages"
    return subprocess.run(
        [sys.executable, "-m", f"{package}.{stage}", *map(str, args)],
        cwd=PROJECT_ROOT,
        env=stage_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def one_line_error(stderr: str, stage: str, *, only: bool = True) -> str:
    """The message of the single ``<stage>: error:`` line that ends ``stderr``.

    With ``only``, that line must be all of stderr; else other lines may come before it
    (a library's warnings), but never a traceback.
    """
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    prefix = f"{stage}: error: "
    assert lines and lines[-1].startswith(prefix), stderr
    assert sum(line.startswith(prefix) for line in lines) == 1, stderr
    if only:
        assert len(lines) == 1, stderr
    return lines[-1].removeprefix(prefix)


def failed_in_one_line(done: subprocess.CompletedProcess[str], stage: str, **options: Any) -> str:
    """Check the stage exited 1 with one error line; return its message."""
    assert done.returncode == 1, done.stderr
    return one_line_error(done.stderr, stage, **options)


def write_params(path: Path, **sections: dict[str, Any]) -> Path:
    """The project's params.yaml with some keys of some sections replaced, written to ``path``."""
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, relative POSIX path -> content."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """Temporaries a stage left under ``folder`` (hidden names with a temporary marker)."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in Path(folder).rglob(".*")
        if any(marker in p.name for marker in TEMPORARY_MARKERS)
    )


# --- A copy of the project in a git repository --------------------------------------------

# What a clone of the project holds that a pipeline run needs.
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "exclude.yaml",
    "stages",
    "classifier",
    "tools",
    "pretrained",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots",
    "dvc_plots_template",
    ".dvcignore",
    ".gitignore",
]


# Every stage of dvc.yaml, in the order a default `dvc repro` runs them. label_issues is
# optional: off by default (label_issues.enabled), it trains nothing and only writes an
# empty table, in seconds (docs/insight.md#training-labels-that-are-probably-wrong).
STAGES = ["download", "preprocess", "label_issues", "train", "evaluate", "export"]


def user_env() -> dict[str, str]:
    """A user's shell in a clone: no MLflow or DVC settings, the project's venv first."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "true"
    return env


def run_in(repo: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """Run a command in ``repo`` as a user would; its exit code is the caller's to check."""
    return subprocess.run(
        command, cwd=repo, env=user_env(), capture_output=True, text=True, timeout=900
    )


def run_ok(repo: Path, *command: str) -> str:
    """Run a command in ``repo`` as a user would; it must succeed. Returns its output."""
    done = run_in(repo, *command)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def lock_md5s(entries: list[dict]) -> dict[str, str]:
    """The md5 of each dep (or out) of a dvc.lock stage entry, by path."""
    return {entry["path"]: entry["md5"] for entry in entries}


def lock_outputs(repo: Path) -> dict[str, bytes]:
    """Every output file dvc.lock records, by path, with its content."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    found: dict[str, bytes] = {}
    for path in paths:
        target = repo / path
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        for file in files:
            found[file.relative_to(repo).as_posix()] = file.read_bytes() if file.is_file() else b""
    return found


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def set_params(repo: Path, section: str = "train", **values: object) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(repo: Path) -> None:
    """Copy what a clone of the project holds (no outputs, no venv) into ``repo``."""
    for name in PROJECT_FILES:
        source, target = PROJECT_ROOT / name, repo / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def init_git(repo: Path) -> None:
    run_ok(repo, "git", "init", "-q")
    run_ok(repo, "git", "config", "user.name", "Pipeline Test")
    run_ok(repo, "git", "config", "user.email", "pipeline-test@example.invalid")
    run_ok(repo, "git", "add", "-A")
    run_ok(repo, "git", "commit", "-qm", "project")


# A pipeline of one stage that needs no TensorFlow, for tests of DVC's queue: its "train"
# writes the learning rate as its metric (and under a nested key, and a NaN beside it).
# float(): PyYAML reads a 1e-05 that `dvc exp run -S` writes as a string (YAML 1.1).
ONE_STAGE = (
    "python -c \"import json, yaml; lr = float(yaml.safe_load(open('params.yaml'))['train']"
    "['learning_rate']); json.dump({'val_accuracy': lr, 'per': {'x': lr}, 'bad': float('nan')}, "
    "open('metrics/train.json', 'w'))\""
)


def one_stage_project(repo: Path) -> Path:
    """A git and DVC repository at ``repo``: the project's params.yaml and a dvc.yaml whose
    one stage, train, writes metrics/train.json in a blink (see ONE_STAGE)."""
    dvc_yaml = {
        "stages": {
            "train": {
                "cmd": ONE_STAGE,
                "params": ["train.learning_rate"],
                "metrics": [{"metrics/train.json": {"cache": False}}],
            }
        }
    }
    (repo / "metrics").mkdir(parents=True)
    (repo / "metrics" / ".gitkeep").touch()
    shutil.copy2(PROJECT_ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    run_ok(repo, "git", "init", "-q")
    run_ok(repo, "dvc", "init", "-q")
    init_git(repo)
    return repo


# --- Files for the data tests: IDX, archives, a scripted HTTP server ----------------------


def write_idx_files(folder, compress=True, train=30, test=10):
    """Small MNIST-like IDX files; returns the arrays written, by role."""
    from classifier.data.idx import write_idx

    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for role, name in IDX_FILES.items():
        write_idx(folder / (name if compress else name.removesuffix(".gz")), arrays[role])
    return arrays


def sha256_of_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def zip_folder(folder, archive, top):
    import zipfile

    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, f"{top}/{path.relative_to(folder).as_posix()}")


def make_zip(path, members, compression=zipfile.ZIP_DEFLATED):
    """A zip of ``members``: name (or ZipInfo) -> content."""
    with zipfile.ZipFile(path, "w", compression) as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    return path


def photo_crops() -> list[np.ndarray]:
    """30 different real photos: 128x128 RGB crops of scikit-learn's two sample photos.

    A 3x5 grid of each photo (china.jpg, then flower.jpg), offline. No two crops are within
    20 bits of each other's perceptual hash.
    """
    from sklearn.datasets import load_sample_images

    return [
        photo[row * 140 : row * 140 + 128, column * 128 : column * 128 + 128]
        for photo in load_sample_images().images
        for row in range(3)
        for column in range(5)
    ]


def save_resized_jpeg(source: Path, dest: Path, scale: float = 1.5, quality: int = 85) -> None:
    """Re-save the image at ``source`` as a JPEG ``scale`` times its size: a near duplicate."""
    from PIL import Image

    with Image.open(source) as picture:
        size = (round(picture.width * scale), round(picture.height * scale))
        picture.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(
            dest, "JPEG", quality=quality
        )


def write_photo_folder(root: Path) -> dict[str, str]:
    """The 30 photo crops as PNGs in class folders ``china/`` and ``flower/``, with copies.

    Every other crop gets a copy beside it, alternately an exact one (the same bytes) and a
    near one (re-saved as a JPEG 1.5 times the size). Returns {copy: original}, as paths
    relative to ``root``.
    """
    from PIL import Image

    copies = {}
    for index, crop in enumerate(photo_crops()):
        folder = root / ("china" if index < 15 else "flower")
        folder.mkdir(parents=True, exist_ok=True)
        original = folder / f"photo_{index:02d}.png"
        Image.fromarray(crop).save(original)
        if index % 4 == 0:
            copy = folder / f"photo_{index:02d}_copy.png"
            shutil.copyfile(original, copy)
        elif index % 4 == 2:
            copy = folder / f"photo_{index:02d}_resized.jpg"
            save_resized_jpeg(original, copy)
        else:
            continue
        copies[copy.relative_to(root).as_posix()] = original.relative_to(root).as_posix()
    return copies


def markdown_rows(markdown: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``markdown``, header rows included."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|")
    ]


class ScriptedServer:
    """Serves each path by a script of actions, one per request; the last one repeats."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[tuple]] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        self.user_agents: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                count = server.requests[self.path]
                server.requests[self.path] += 1
                server.user_agents.append(self.headers.get("User-Agent", ""))
                script = server.scripts.get(self.path, [("status", 404)])
                action, *args = script[min(count, len(script) - 1)]
                # The client may hang up mid-body, as some tests want it to.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    getattr(self, f"serve_{action}")(*args)
                self.close_connection = True

            def head(self, status, length):
                self.send_response(status)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()

            def serve_ok(self, body):
                self.head(200, len(body))
                self.wfile.write(body)

            def serve_status(self, code):
                self.head(code, 0)

            def serve_redirect(self, location):
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def serve_nolength(self, body):
                self.head(200, None)
                self.wfile.write(body)

            def serve_truncate(self, body):
                self.head(200, len(body) * 2)
                self.wfile.write(body)

            def serve_hangup(self):
                pass  # close without a status line

            def serve_slow(self, seconds, body):
                time.sleep(seconds)
                self.serve_ok(body)

            def serve_stall(self, body, seconds):
                self.head(200, len(body))
                self.wfile.write(body[:1000])
                self.wfile.flush()
                time.sleep(seconds)

            def serve_endless(self):
                self.head(200, None)
                for _ in range(1000):  # 64 MB at most, should the client never stop
                    self.wfile.write(bytes(1 << 16))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str, *script: tuple) -> str:
        if script:
            self.scripts[path] = list(script)
        return self.base + path


# --- Obeying file permissions as root -----------------------------------------------------

# Root ignores file permissions through two capabilities; drop them to test read-only folders.
CAP_DAC_OVERRIDE = 1


CAP_DAC_READ_SEARCH = 2


PR_CAPBSET_DROP = 24


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_root_file_override() -> None:
    """``preexec_fn``: the child (and what it execs) obeys file permissions even as root."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@contextlib.contextmanager
def obeying_file_permissions() -> Iterator[None]:
    """Within the block, this thread obeys file permissions even as root.

    Capabilities belong to a thread: dropping CAP_DAC_OVERRIDE from this thread's effective
    set (it stays permitted, so it can come back) leaves the rest of the process alone.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    saved = data[0].effective
    data[0].effective = saved & ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` made read-only (0o555) for the block, then writable again."""
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


def require_read_only(folder: Path, *, in_child: bool) -> None:
    """Skip unless writing into ``folder`` is refused here (the way the test will write)."""
    probe = folder / "probe"
    if in_child:
        done = subprocess.run(
            [sys.executable, "-c", f"open({str(probe)!r}, 'w')"],
            preexec_fn=drop_root_file_override,
            capture_output=True,
        )
        refused = done.returncode != 0
    else:
        with obeying_file_permissions():
            try:
                probe.write_text("x")
                refused = False
            except PermissionError:
                refused = True
    if not refused:
        probe.unlink(missing_ok=True)
        pytest.skip(f"cannot make {folder} read-only here")


# --- A team on 127.0.0.1: S3, an MLflow server, clones ------------------------------------

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


def run_command(
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
        return run_command(self.path, *command, env={**self.env, **env}, check=check)

    def out(self, *command: str) -> str:
        return self.run(*command).stdout


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


# --- Load and processes ---------------------------------------------------------------------

BUSY_LOOP = "while True: pass"


@contextmanager
def cpu_burner(processes: int = 2) -> Iterator[None]:
    """Keep ``processes`` cores busy for the block: a test of behaviour under load."""
    from classifier.processes import ProcessGroup

    burners = [
        ProcessGroup.start("CPU burner", [sys.executable, "-c", BUSY_LOOP])
        for _ in range(processes)
    ]
    try:
        yield
    finally:
        for burner in burners:
            burner.stop(grace=1)


def clone_repo(source: Path, dest: Path) -> Path:
    """A copy of a project repository after a run, sharing nothing with ``source``.

    Git, DVC's cache, the outputs and the MLflow store are copied; the store's recorded
    absolute paths (artifact locations, model sources) are moved to the copy, so runs and
    models logged in one never land in the other. Lets a test change a pipeline that
    another built, without a run of its own and without touching anyone else's.
    """
    import sqlite3

    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
    database = dest / "mlflow.db"
    if database.exists():
        old, new = f"{Path(source).resolve()}/", f"{Path(dest).resolve()}/"
        with contextlib.closing(sqlite3.connect(database)) as db:
            tables = [
                row[0] for row in db.execute("select name from sqlite_master where type='table'")
            ]
            for table in tables:
                for column in db.execute(f"pragma table_info('{table}')").fetchall():
                    name, kind = column[1], column[2].upper()
                    if "CHAR" in kind or "TEXT" in kind:
                        db.execute(
                            f'update "{table}" set "{name}" = replace("{name}", ?, ?) '
                            f'where "{name}" like ?',
                            (old, new, f"%{old}%"),
                        )
            db.commit()
    return dest


# --- Pages as a person sees them: headless Chromium ----------------------------------------

CHROMIUM_WAIT_MS = 20_000  # virtual time for scripts to draw; Chromium stops early when idle


def _without_network() -> list[str]:
    """A prefix that runs a command in a network namespace of its own (no network at all)
    where the kernel allows it; Chromium's own flags below block the network anyway."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


def offline_chromium(url: str, *options: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``url`` with no network: any http(s) request fails."""
    command = [
        *_without_network(),
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",  # nothing listens there: every fetch fails
        f"--virtual-time-budget={CHROMIUM_WAIT_MS}",
        *options,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed on {url}:\n{done.stderr[-2000:]}"
    return done


def offline_dom(url: str) -> str:
    """The DOM of ``url`` after its scripts ran, offline."""
    return offline_chromium(url, "--dump-dom").stdout


def offline_screenshot(url: str, png: Path, width: int = 1400, height: int = 1000) -> Path:
    """A PNG of ``url`` as Chromium draws it offline."""
    offline_chromium(url, f"--screenshot={png}", f"--window-size={width},{height}")
    return png


@dataclass
class VegaChart:
    """A chart as vega-embed drew it into a page: what a person reads on it."""

    titles: list[str]  # the chart's title, and a facet's headers (e.g. each rev)
    drawn: bool  # an SVG of marks is there
    axis_titles: list[str]
    axis_labels: list[list[str]]  # one list per axis, as drawn
    legend_labels: list[str]


def vega_charts(dom: str) -> dict[str, VegaChart]:
    """The charts vega-embed drew (as SVG) in ``dom``, by the id of their element."""
    text = r"<text[^>]*>([^<]*)</text>"
    charts: dict[str, VegaChart] = {}
    starts = list(re.finditer(r'<div id="([^"]+)" class="vega-embed[^"]*">', dom))
    for start, after in itertools.zip_longest(starts, starts[1:]):
        chunk = dom[start.end() : after.start() if after else len(dom)]
        labels, legend = (
            re.findall(rf'role-{role}-label"[^>]*>((?:<text[^>]*>[^<]*</text>)+)', chunk)
            for role in ("axis", "legend")
        )
        charts[start.group(1)] = VegaChart(
            titles=re.findall(r'role-title-text"[^>]*>' + text, chunk),
            drawn=re.search(r'<svg [^>]*class="marks"', chunk) is not None,
            axis_titles=re.findall(r'role-axis-title"[^>]*>' + text, chunk),
            axis_labels=[re.findall(text, axis) for axis in labels],
            legend_labels=[label for group in legend for label in re.findall(text, group)],
        )
    return charts


# Headless Chromium, Debian's package, for what a person sees in a browser.
CHROMIUM = "chromium"
CHROMIUM_START_SECONDS = 60


def chromium() -> str:
    """The path of Chromium, installed with apt-get where it is missing; skip if it can't be.

    The test that calls this skips, saying why, only where the package cannot be installed
    (no apt-get, no root, no network).
    """
    found = shutil.which(CHROMIUM)
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is not installed and there is no apt-get to install it")
    steps = (["apt-get", "update"], ["apt-get", "install", "-y", CHROMIUM])
    for step in steps:
        done = subprocess.run(
            step,
            capture_output=True,
            text=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"{CHROMIUM} is not installed and `{' '.join(step)}` failed: {last}")
    found = shutil.which(CHROMIUM)
    if not found:
        pytest.skip(f"`apt-get install -y {CHROMIUM}` left no {CHROMIUM} on PATH")
    return found


class DevToolsPage:
    """One browser tab, driven over Chromium's DevTools protocol (JSON over a websocket).

    The websocket is the few lines the protocol needs (RFC 6455: a handshake, masked text
    frames out, unmasked frames in), so the tests need no browser-automation package.
    """

    def __init__(self, websocket_url: str, timeout: float = 60.0) -> None:
        import base64
        import urllib.parse

        address = urllib.parse.urlsplit(websocket_url)
        self.socket = socket.create_connection((address.hostname, address.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall(
            (
                f"GET {address.path} HTTP/1.1\r\nHost: {address.netloc}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self._read(1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"DevTools refused the websocket: {head[:200]!r}")
        self.calls = itertools.count(1)

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.socket.recv(size - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the websocket")
            data += chunk
        return data

    def _receive(self) -> bytes:
        import struct

        message = b""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack(">H", self._read(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", self._read(8))[0]
            message += self._read(size)
            if first & 0x80:  # the final fragment
                return message

    def _send(self, payload: bytes) -> None:
        import struct

        size = len(payload)
        if size < 126:
            header = bytes([0x81, 0x80 | size])
        elif size < 1 << 16:
            header = bytes([0x81, 0x80 | 126]) + struct.pack(">H", size)
        else:
            header = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", size)
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.socket.sendall(header + mask + masked)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one protocol command and return its result (events meanwhile are dropped)."""
        import json

        call_id = next(self.calls)
        self._send(json.dumps({"id": call_id, "method": method, "params": params}).encode())
        while True:
            reply = json.loads(self._receive())
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Load ``url`` as a new page: the app starts afresh, as when a person opens a link."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 90.0) -> Any:
        """The first truthy value of ``expression``; None if it stays falsy ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the page is between documents, or not yet built
                value = None
            if value or time.monotonic() > deadline:
                return value or None
            time.sleep(0.5)

    def text(self) -> str:
        """The page's rendered text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def browser(tmp: Path, width: int = 1400, height: int = 1000) -> Iterator[DevToolsPage]:
    """A tab of headless Chromium with a fresh profile in ``tmp``: what a newcomer has."""
    import json
    import urllib.request

    from classifier.processes import ProcessGroup

    profile = tmp / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
        f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
    ]  # fmt: skip
    with ProcessGroup.start("chromium", command, log_path=tmp / "chromium.log") as group:
        port_file = profile / "DevToolsActivePort"
        group.wait_until(
            lambda: port_file.exists() and bool(port_file.read_text().strip()),
            CHROMIUM_START_SECONDS,
        )
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            targets = json.load(answer)
        page = DevToolsPage(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        page.call("Page.enable")
        try:
            yield page
        finally:
            page.socket.close()
