"""Compare a window of the prediction log with what the model saw in training: drift or not.

Three signals, each a two-sample statistic against a threshold at ``alpha``:

- **class mix**: the classes the model gave (its best guess, abstentions included) against
  the training split's class shares: Pearson's chi-square, threshold its (1 - alpha)
  quantile with classes - 1 degrees of freedom;
- **confidence** and **OOD score**: Kolmogorov-Smirnov's D against the validation split's
  (what the model gives images like the training ones that it did not fit: the training
  split's own confidences are too high), threshold the asymptotic critical value
  ``sqrt(-ln(alpha / 2) / 2) * sqrt((n + m) / (n m))``.

Drift is flagged when any statistic is over its threshold. The reference figures travel
with the registered model (classifier/serving/prepare.py writes them at export), so the
monitor needs only the log and the registry. :func:`render_html` writes the report
(a Jinja2 template, charts from matplotlib inlined).
"""

from __future__ import annotations

import base64
import datetime
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from classifier.tracking import names

# Fewer predictions say nothing about a distribution (and the chi-square needs counts).
MIN_WINDOW = 20
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class MonitorError(ValueError):
    """The log or the model cannot be compared: too few predictions, no reference."""


@dataclass(frozen=True)
class Signal:
    """One comparison: its statistic, the threshold and whether it is over it."""

    name: str
    statistic: str
    value: float
    threshold: float
    p_value: float
    window_size: int
    reference_size: int

    @property
    def drift(self) -> bool:
        return self.value > self.threshold


@dataclass(frozen=True)
class Reference:
    """What the model was trained and validated on, as the registered model records it."""

    class_names: Sequence[str]
    train_class_counts: np.ndarray
    confidence: np.ndarray  # validation split
    ood_score: np.ndarray | None  # validation split; None for models without OOD statistics
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """A window of the log against the reference."""

    model: str
    version: int | None
    alpha: float
    window: dict[str, Any]  # size, first and last time, abstain rate
    signals: list[Signal]
    class_mix: list[dict[str, Any]]
    distributions: dict[str, dict[str, list[float]]]  # signal -> window/reference quantiles

    @property
    def drift(self) -> bool:
        return any(signal.drift for signal in self.signals)

    def metrics(self) -> dict[str, float]:
        """Numbers for the monitoring run."""
        figures = {
            names.monitor_metric("drift"): float(self.drift),
            names.monitor_metric("window_size"): float(self.window["size"]),
        }
        if self.window["abstain_rate"] is not None:
            figures[names.monitor_metric("abstain_rate")] = self.window["abstain_rate"]
        for signal in self.signals:
            key = signal.name.replace(" ", "_")
            figures[names.monitor_metric(key, "statistic")] = signal.value
            figures[names.monitor_metric(key, "threshold")] = signal.threshold
            figures[names.monitor_metric(key, "p_value")] = signal.p_value
            figures[names.monitor_metric(key, "drift")] = float(signal.drift)
        return figures

    def summary(self) -> dict[str, Any]:
        signals = [{**asdict(signal), "drift": signal.drift} for signal in self.signals]
        return {"model": self.model, "version": self.version, "drift": self.drift,
                "alpha": self.alpha, "window": self.window, "signals": signals}  # fmt: skip


def class_mix_signal(predicted: np.ndarray, train_counts: np.ndarray, alpha: float) -> Signal:
    """Chi-square of the window's class counts against the training shares."""
    from scipy.stats import chi2, chisquare

    observed = np.bincount(predicted, minlength=len(train_counts)).astype(float)
    present = train_counts > 0
    expected = train_counts[present] / train_counts[present].sum() * len(predicted)
    # A class the training data lacks cannot be expected; any image of it is drift.
    unexpected = observed[~present].sum()
    result = chisquare(observed[present], expected * observed[present].sum() / expected.sum())
    freedom = max(int(present.sum()) - 1, 1)
    value = math.inf if unexpected else float(result.statistic)
    return Signal(
        "class mix", "chi-square", value, float(chi2.ppf(1 - alpha, freedom)),
        0.0 if unexpected else float(result.pvalue), len(predicted), int(train_counts.sum()),
    )  # fmt: skip


def ks_signal(name: str, window: np.ndarray, reference: np.ndarray, alpha: float) -> Signal:
    """Kolmogorov-Smirnov's D of ``window`` against ``reference``, and its critical value."""
    from scipy.stats import ks_2samp

    result = ks_2samp(window, reference)
    n, m = len(window), len(reference)
    critical = math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))
    return Signal(name, "Kolmogorov-Smirnov D", float(result.statistic), critical,
                  float(result.pvalue), n, m)  # fmt: skip


def _quantiles(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in np.quantile(values, QUANTILES)]


def compare(records: Sequence[Mapping[str, Any]], reference: Reference, alpha: float) -> Comparison:
    """The window ``records`` (prediction log lines of one model version) against ``reference``."""
    if len(records) < MIN_WINDOW:
        raise MonitorError(
            f"only {len(records)} predictions in the window; the monitor needs at least "
            f"{MIN_WINDOW} to compare distributions"
        )
    predicted = np.array([int(record["class_index"]) for record in records])
    if predicted.max() >= len(reference.class_names) or predicted.min() < 0:
        raise MonitorError("the log names classes this model does not have: another model?")
    confidence = np.array([float(record["confidence"]) for record in records])
    scores = [record.get("ood_score") for record in records]
    signals = [
        class_mix_signal(predicted, reference.train_class_counts, alpha),
        ks_signal("confidence", confidence, reference.confidence, alpha),
    ]
    distributions = {
        "confidence": {
            "window": _quantiles(confidence),
            "reference": _quantiles(reference.confidence),
        }
    }
    if reference.ood_score is not None and all(score is not None for score in scores):
        ood_scores = np.array(scores, dtype=float)
        signals.append(ks_signal("ood score", ood_scores, reference.ood_score, alpha))
        distributions["ood score"] = {
            "window": _quantiles(ood_scores),
            "reference": _quantiles(reference.ood_score),
        }
    counts = np.bincount(predicted, minlength=len(reference.class_names))
    train_share = reference.train_class_counts / max(reference.train_class_counts.sum(), 1)
    class_mix = [
        {
            "class": name,
            "training": round(float(share), 4),
            "window": round(count / len(predicted), 4),
        }
        for name, share, count in zip(reference.class_names, train_share, counts, strict=True)
    ]
    abstained = [record.get("abstain_reason") for record in records]
    window = {
        "size": len(records),
        "first": records[0].get("time"),
        "last": records[-1].get("time"),
        "abstain_rate": round(sum(r is not None for r in abstained) / len(records), 4),
    }
    first = records[-1]
    return Comparison(first.get("model"), first.get("version"), alpha, window, signals,
                      class_mix, distributions)  # fmt: skip


def _histogram_png(name: str, window: np.ndarray, reference: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 2.6), dpi=100)
    bins = np.histogram_bin_edges(np.r_[window, reference], bins=30)
    axes.hist(reference, bins=bins, density=True, alpha=0.5, label="validation (reference)")
    axes.hist(window, bins=bins, density=True, alpha=0.5, label="window")
    axes.set_xlabel(name)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Monitoring: {{ c.model }} version {{ c.version }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc;
padding: .3em .6em; text-align: right; } th:first-child, td:first-child { text-align: left; }
.drift { color: #b00; font-weight: bold; } .ok { color: #060; font-weight: bold; }
</style></head><body>
<h1>{{ c.model }} version {{ c.version }}:
{% if c.drift %}<span class="drift">drift</span>
{%- else %}<span class="ok">no drift</span>{% endif %}</h1>
<p>{{ c.window.size }} predictions from {{ c.window.first }} to {{ c.window.last }}, against
the training data the model was registered with; each test at alpha {{ c.alpha }}.
Report made {{ made }}.</p>
<table><tr><th>signal</th><th>statistic</th><th>value</th><th>threshold</th><th>p-value</th>
<th>window</th><th>reference</th><th>drift</th></tr>
{% for s in c.signals %}<tr><td>{{ s.name }}</td><td>{{ s.statistic }}</td>
<td>{{ "%.4g"|format(s.value) }}</td><td>{{ "%.4g"|format(s.threshold) }}</td>
<td>{{ "%.3g"|format(s.p_value) }}</td><td>{{ s.window_size }}</td><td>{{ s.reference_size }}</td>
<td>{% if s.drift %}<span class="drift">yes</span>{% else %}no{% endif %}</td></tr>
{% endfor %}</table>
<p>Abstained on {{ "%.1f"|format(100 * c.window.abstain_rate) }} % of the window
{%- if reference_abstain is not none %} ({{ "%.1f"|format(100 * reference_abstain) }} % of
the validation images){% endif %}.</p>
<h2>Class mix</h2>
<table><tr><th>class</th><th>training share</th><th>window share</th></tr>
{% for row in c.class_mix %}<tr><td>{{ row["class"] }}</td>
<td>{{ "%.3f"|format(row.training) }}</td><td>{{ "%.3f"|format(row.window) }}</td></tr>
{% endfor %}</table>
{% for name, q in c.distributions.items() %}<h2>{{ name|capitalize }}</h2>
<table><tr><th></th>{% for p in quantiles %}<th>p{{ (100 * p)|round|int }}</th>{% endfor %}</tr>
<tr><td>window</td>{% for v in q.window %}<td>{{ v }}</td>{% endfor %}</tr>
<tr><td>validation</td>{% for v in q.reference %}<td>{{ v }}</td>{% endfor %}</tr></table>
{% if charts[name] %}<img alt="{{ name }} histograms"
 src="data:image/png;base64,{{ charts[name] }}">{% endif %}
{% endfor %}
</body></html>
"""


def render_html(
    comparison: Comparison,
    reference: Reference,
    records: Sequence[Mapping[str, Any]],
    made: datetime.datetime | None = None,
) -> str:
    """The report: verdict, signals, class mix, and each distribution against the reference."""
    import jinja2

    charts = {"confidence": _histogram_png(
        "confidence", np.array([r["confidence"] for r in records], float), reference.confidence
    )}  # fmt: skip
    if "ood score" in comparison.distributions and reference.ood_score is not None:
        scores = np.array([r["ood_score"] for r in records], float)
        charts["ood score"] = _histogram_png("OOD score", scores, reference.ood_score)
    reference_abstain = None
    threshold = reference.settings.get("confidence_threshold")
    if threshold is not None:
        unsure = reference.confidence < threshold
        if reference.ood_score is not None and reference.settings.get("ood_threshold") is not None:
            unsure |= reference.ood_score > reference.settings["ood_threshold"]
        reference_abstain = float(unsure.mean())
    environment = jinja2.Environment(autoescape=True)
    made = made or datetime.datetime.now(datetime.UTC)
    return environment.from_string(TEMPLATE).render(
        c=comparison, charts=charts, quantiles=QUANTILES, reference_abstain=reference_abstain,
        made=made.isoformat(timespec="seconds"),
    )  # fmt: skip
