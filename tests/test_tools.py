"""The entry points beside the pipeline: one clear line when there is nothing to do."""

from __future__ import annotations

import asyncio
import json
import socket

import mlflow

from classifier.tracking import names, runs, store
from tests.helpers import PROJECT_ROOT, free_port
from tools import champion_rev, compare, serve, ui


def test_ui_on_a_port_in_use_exits_1_in_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert ui.main(["--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"ui: error: port {port} on 127.0.0.1 is in use (Address already in use); "
        f"choose another: make ui MLFLOW_PORT={port + 1}\n"
    )


def test_ui_takes_a_port_whose_server_stopped_a_moment_ago():
    """The server's side of a closed connection waits out TIME_WAIT on the port; MLflow's
    server binds over it, so the check must not call the port taken."""
    port = free_port()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            accepted.close()  # the server closes first: its port enters TIME_WAIT
    ui.check_port_free("127.0.0.1", port)


def test_serve_with_no_registered_model_exits_1_in_one_line(mlflow_store, capsys):
    assert serve.main(["--model-name", "never-registered"]) == 1
    assert capsys.readouterr().err == (
        f"serve: error: no version of never-registered is @champion in {mlflow_store}; "
        "run the pipeline (make run) first, or name another model with --model-name\n"
    )


def test_make_serve_reads_a_quoted_model_name_as_yaml(mlflow_store, tmp_path, capsys):
    import shutil
    import subprocess

    params = (PROJECT_ROOT / "params.yaml").read_text()
    quoted = params.replace("model_name: digits-cnn", "model_name: 'digits-cnn'  # quoted")
    assert quoted != params
    (tmp_path / "params.yaml").write_text(quoted)
    shutil.copy(PROJECT_ROOT / "Makefile", tmp_path / "Makefile")
    planned = subprocess.run(
        ["make", "-n", "serve"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    (line,) = [line for line in planned.splitlines() if "tools.serve" in line]
    assert "--model-name" not in line  # tools.serve reads the name, as YAML
    assert serve.main(["--params", str(tmp_path / "params.yaml")]) == 1
    assert "no version of digits-cnn is @champion" in capsys.readouterr().err


def finished_run_named(name: str) -> str:
    with runs.training_run({"data.source": "test"}) as run_id:
        mlflow.set_tag("mlflow.runName", name)
    return run_id


def test_compare_refuses_a_name_two_runs_share_and_lists_them(mlflow_store, tmp_path, capsys):
    first, second = finished_run_named("same"), finished_run_named("same")
    other = finished_run_named("other")
    code = compare.main(["same", "other", "--out", str(tmp_path / "c.html")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("compare: error: 2 finished runs are named 'same'; give a run id")
    assert first in err and second in err and other not in err
    assert not (tmp_path / "c.html").exists()


def test_compare_refuses_to_compare_a_run_with_itself(mlflow_store, tmp_path, capsys):
    run_id = finished_run_named("once")
    code = compare.main(["once", run_id, "--out", str(tmp_path / "c.html")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1
    assert err == (
        f"compare: error: once and {run_id} are the same run ({run_id}); name two different runs\n"
    )
    assert not (tmp_path / "c.html").exists()


def test_compare_without_a_champion_says_which_two_runs_it_took(mlflow_store, caplog):
    from classifier.evaluation.compare import resolve_run_ids

    older, newer = finished_run_named("older"), finished_run_named("newer")
    newest = finished_run_named("newest")  # three runs: the latest two are taken
    with caplog.at_level("WARNING"):
        chosen = resolve_run_ids([], "no-such-model")
    assert chosen == [newest, newer] and older not in chosen
    assert "no-such-model has no @champion: comparing the two latest finished runs, " in (
        caplog.text
    )


def test_compare_of_a_run_id_that_does_not_exist_is_one_line(mlflow_store, tmp_path, capsys):
    finished_run_named("one")
    code = compare.main(["0" * 32, "one", "--out", str(tmp_path / "c.html")])
    assert code == 1
    assert capsys.readouterr().err == (
        f"compare: error: MLflow store {mlflow_store}: no run {'0' * 32}\n"
    )


def test_compare_on_a_store_that_does_not_answer_is_one_line(monkeypatch, tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert compare.main(["--out", str(tmp_path / "c.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"compare: error: MLflow store {uri}: the tracking server does not")
    assert len(err.splitlines()) == 1


def test_training_runs_without_a_dvc_experiment_get_names_of_their_own(mlflow_store, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    names = set()
    for _ in range(3):
        with runs.training_run({"data.source": "digits"}) as run_id:
            pass
        names.add(mlflow.MlflowClient().get_run(run_id).info.run_name)
    assert len(names) == 3
    assert all(name.startswith("digits-") for name in names)
    assert store.tracking_uri() == mlflow_store


def test_ui_points_at_the_pipelines_runs_in_the_model_training_view(mlflow_store):
    url = ui.experiment_url("127.0.0.1", 5000)
    experiment_id = mlflow.MlflowClient(mlflow_store).get_experiment_by_name("tests")
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id.experiment_id}"
        "?workflowType=machine_learning"
    )


def test_champion_rev_with_no_champion_exits_1_in_one_line(mlflow_store, capsys):
    assert champion_rev.main(["--params", str(PROJECT_ROOT / "params.yaml")]) == 1
    assert capsys.readouterr().err == (
        "champion_rev: error: no version of digits-cnn is @champion: run the pipeline first\n"
    )


PAGE = b'<!doctype html><html><head><meta charset="utf-8"/><script src="app.js"></script></head>'


def served(path: str, content_type: bytes = b"text/html; charset=utf-8") -> tuple[dict, bytes]:
    """What ``ui.BrowserDefaults`` sends for ``path`` of an app that answers ``PAGE`` in two
    chunks."""

    async def app(scope, receive, send):
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(PAGE))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": PAGE[:20], "more_body": True})
        await send({"type": "http.response.body", "body": PAGE[20:]})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    wrapped = ui.BrowserDefaults(app, ui.browser_defaults("7"))
    asyncio.run(wrapped({"type": "http", "path": path}, None, send))
    return sent[0], b"".join(m.get("body", b"") for m in sent[1:])


def test_the_ui_page_stores_the_runs_view_before_the_app_starts():
    start, page = served("/")
    head = page.index(b"<head>") + len(b"<head>")
    assert page.startswith(b"<script>", head)
    assert page.index(b"</script>") < page.index(b'<script src="app.js">')
    headers = dict(start["headers"])
    assert int(headers[b"content-length"]) == len(page)
    script = page[head : page.index(b"</script>")].decode()
    assert "localStorage.getItem(k)===null" in script  # a person's own choice stays
    defaults = json.loads(script[script.index("var d=") + len("var d=") : script.index(";for")])
    assert json.loads(defaults[ui.WORKFLOW_TYPE_KEY]) == "machine_learning"
    columns = json.loads(
        defaults['MLflowLocalStorage-1.1-ExperimentPage-["7"]-ReactComponentState']
    )
    assert columns["selectedColumns"][:5] == [
        f"metrics.`{names.TEST_ACCURACY}`",
        f"metrics.`{names.TEST_MACRO_F1}`",
        f"metrics.`{names.VAL_LOSS}`",
        "params.`train.architecture`",
        "params.`train.epochs`",
    ]


def test_the_ui_server_leaves_every_other_answer_as_mlflow_sent_it():
    for path, content_type in (("/static-files/x.js", b"text/html"), ("/", b"application/json")):
        start, body = served(path, content_type)
        assert body == PAGE
        assert dict(start["headers"])[b"content-length"] == b"%d" % len(PAGE)
