"""The page `dvc plots show` writes: Vega inline from the pinned copies, nothing fetched."""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import yaml
from dvc_render import render_html

from classifier.data.dataset import ImageSet
from classifier.evaluation.metrics import confusion_counts
from tests.helpers import PROJECT_ROOT, offline_dom, run_ok, vega_charts
from tools import plots_page

TEMPLATE_DIR = PROJECT_ROOT / "dvc_plots_template"


def test_the_committed_page_is_the_one_built_from_the_pinned_scripts():
    assert plots_page.main(["--check"]) == 0
    page = (TEMPLATE_DIR / "page.html").read_text(encoding="utf-8")
    manifest = json.loads((TEMPLATE_DIR / "vendor.json").read_text())
    for name in plots_page.SCRIPTS:
        script = (TEMPLATE_DIR / name).read_bytes()
        assert hashlib.sha256(script).hexdigest() == manifest[name]["sha256"]
        assert script.decode("utf-8").rstrip("\n") in page


def test_the_page_loads_no_script_from_the_network():
    page = (TEMPLATE_DIR / "page.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", page, re.IGNORECASE)
    # DVC puts its CDN <script src> tags where the template says {scripts}.
    assert "{scripts}" not in page
    assert "{plot_divs}" in page


def test_dvc_is_configured_to_fill_in_the_offline_page():
    config = configparser.ConfigParser()
    config.read(PROJECT_ROOT / ".dvc" / "config")
    template = PROJECT_ROOT / ".dvc" / config["plots"]["html_template"]
    assert template.resolve() == (TEMPLATE_DIR / "page.html").resolve()


def test_dvc_render_fills_the_page_without_a_cdn_tag(tmp_path):
    from dvc_render import VegaRenderer

    renderer = VegaRenderer(
        [{"epoch": "0", "loss": "1.0"}, {"epoch": "1", "loss": "0.5"}],
        "loss",
        x="epoch",
        y="loss",
        y_label="cross-entropy loss",
    )
    out = tmp_path / "dvc_plots" / "index.html"
    render_html([renderer], out, html_template=TEMPLATE_DIR / "page.html")
    page = out.read_text(encoding="utf-8")
    assert "cdn.jsdelivr.net" not in page
    assert "vegaEmbed('#" in page and '"cross-entropy loss"' in page


def test_check_rejects_a_vendored_script_that_differs_from_its_pin(tmp_path, monkeypatch):
    copy = tmp_path / "dvc_plots_template"
    shutil.copytree(TEMPLATE_DIR, copy)
    with (copy / "vega-lite.min.js").open("a") as script:
        script.write("// changed\n")
    monkeypatch.setattr(plots_page, "TEMPLATE_DIR", copy)
    with pytest.raises(ValueError, match=r"vega-lite\.min\.js: sha256 .* but vendor\.json pins"):
        plots_page.build_page(copy)
    assert plots_page.main(["--check"]) == 1


def test_check_reports_a_page_edited_by_hand(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "dvc_plots_template"
    shutil.copytree(TEMPLATE_DIR, copy)
    page = copy / "page.html"
    page.write_text(page.read_text(encoding="utf-8").replace("DVC plots", "Plots"))
    monkeypatch.setattr(plots_page, "TEMPLATE_DIR", copy)
    assert plots_page.main(["--check"]) == 1
    assert "page.html is out of date: run python -m tools.plots_page" in capsys.readouterr().err


def project_plot(title: str) -> dict:
    """The definition of the plot ``title`` in the project's dvc.yaml."""
    plots = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["plots"]
    return next(plot for plot in plots if isinstance(plot, dict) and title in plot)


@pytest.mark.slow
def test_the_confusion_matrix_shows_a_class_never_predicted_offline(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    run_ok(repo, "dvc", "init", "--no-scm", "-q")
    for name in (".dvc/config", ".dvc/plots", "dvc_plots_template"):
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, dirs_exist_ok=True)
        else:
            shutil.copy2(source, repo / name)
    plot = project_plot("Confusion matrix (test)")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [plot]}))
    (repo / "plots" / "evaluate").mkdir(parents=True)
    labels, predicted = np.array([0, 0, 0, 1, 2, 2]), np.array([0, 0, 0, 1, 0, 1])
    test = ImageSet(np.zeros((6, 1, 1, 1), np.uint8), labels, ("ant", "bee", "fox"))
    # Nothing is predicted "fox": with one row per image, DVC's matrix had no "fox" row.
    counts = confusion_counts(test, predicted)
    counts.to_csv(repo / "plots" / "evaluate" / "confusion.csv", index=False)

    run_ok(repo, "dvc", "plots", "show")

    page = repo / "dvc_plots" / "index.html"
    assert not re.search(r"<script[^>]*\bsrc=", page.read_text(encoding="utf-8"))
    (chart,) = vega_charts(offline_dom(page.as_uri())).values()
    assert chart.drawn and "Confusion matrix (test)" in chart.titles
    assert sorted(chart.axis_titles) == ["actual class", "predicted class"]
    assert chart.axis_labels == [["ant", "bee", "fox"], ["ant", "bee", "fox"]]
    # The colour scale reaches the 3 ants seen as ants: counts are summed, not rows counted.
    assert max(float(label) for label in chart.legend_labels) == 3


@pytest.mark.slow
def test_a_chart_that_cannot_be_drawn_leaves_a_line_saying_so(tmp_path):
    from dvc_render import VegaRenderer

    broken = tmp_path / "broken.json"
    broken.write_text(
        json.dumps(
            {
                "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
                "data": {"values": "<DVC_METRIC_DATA>"},
                "title": "<DVC_METRIC_TITLE>",
                "mark": "no-such-mark",
                "encoding": {"x": {"field": "<DVC_METRIC_X>"}, "y": {"field": "<DVC_METRIC_Y>"}},
            }
        )
    )
    points = [{"epoch": "0", "loss": "1.0"}, {"epoch": "1", "loss": "0.5"}]
    renderers = [
        VegaRenderer(points, "drawn", x="epoch", y="loss", title="Drawn"),
        VegaRenderer(points, "broken", x="epoch", y="loss", title="Broken", template=str(broken)),
    ]
    page = tmp_path / "dvc_plots" / "index.html"
    render_html(renderers, page, html_template=TEMPLATE_DIR / "page.html")

    dom = offline_dom(page.as_uri())

    charts = vega_charts(dom)
    assert charts["drawn"].drawn
    failed = re.findall(r'<p class="plot-failed">([^<]*)</p>', dom)
    assert len(failed) == 1
    assert failed[0].startswith("This chart could not be drawn (") and "Broken" in failed[0]
