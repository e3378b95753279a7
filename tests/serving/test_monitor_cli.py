"""The monitor's command line: what it refuses, in one line, before it reads the registry."""

import pytest

from classifier.serving.prediction_log import PredictionLog
from tests.helpers import PROJECT_ROOT
from tools import monitor

PARAMS = str(PROJECT_ROOT / "params.yaml")


@pytest.mark.parametrize("alpha", ["5", "0", "-0.1", "1"])
def test_an_alpha_outside_zero_to_one_is_refused_naming_the_range(alpha, capsys):
    with pytest.raises(SystemExit) as stopped:
        monitor.parse_args(["--alpha", alpha])
    assert stopped.value.code == 2
    assert f"--alpha must be between 0 and 1 (a test level such as 0.01), got {float(alpha)}" in (
        capsys.readouterr().err
    )


def test_a_start_time_after_every_prediction_is_one_line_naming_the_newest(tmp_path, capsys):
    log = PredictionLog(tmp_path / "log", max_bytes=10**6, backups=1)
    record = {
        "class_name": "1",
        "class_index": 1,
        "confidence": 0.9,
        "ood_score": 1.0,
        "abstain_reason": None,
    }
    import numpy as np

    log.append({"model": "digits-cnn", "version": 1}, np.zeros((1, 8, 8, 1), np.uint8), [record], 0)
    log.close()
    argv = ["--params", PARAMS, "--log-dir", str(tmp_path / "log"), "--since", "2099-01-01"]
    assert monitor.main([*argv, "--out", str(tmp_path / "m.html")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "no predictions of digits-cnn version 1 since 2099-01-01T00:00:00+00:00" in err[0]
    assert "Traceback" not in err[0] and not (tmp_path / "m.html").exists()
