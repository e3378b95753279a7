"""The pictures people look at instead of tables: matplotlib figures, saved as PNG.

Every function returns a figure; the caller saves it (for DVC) and logs it (to MLflow).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def save(figure: Figure, target: object, **options: object) -> None:
    """Save ``figure`` as PNG to a path or file object, then free it."""
    figure.savefig(target, format="png", dpi=100, **options)
    plt.close(figure)


def confusion_figure(counts: pd.DataFrame, class_names: Sequence[str]) -> Figure:
    """A confusion-matrix heat map with counts in the cells, from ``confusion_counts``."""
    matrix = counts.pivot(index="actual", columns="predicted", values="count").reindex(
        index=class_names, columns=class_names, fill_value=0
    )
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix.to_numpy(), cmap="Blues")
    axes.set(
        xticks=range(len(class_names)),
        yticks=range(len(class_names)),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="actual",
        title="Confusion matrix (test)",
    )
    plt.setp(axes.get_xticklabels(), rotation=45, ha="right")
    threshold = matrix.to_numpy().max() / 2
    for row, actual in enumerate(class_names):
        for column, predicted in enumerate(class_names):
            count = matrix.loc[actual, predicted]
            if count:
                axes.text(
                    column,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if count > threshold else "black",
                )
    figure.tight_layout()
    return figure


def reliability_figure(bins: pd.DataFrame, ece: float) -> Figure:
    """Accuracy against confidence per bin; a calibrated model follows the diagonal."""
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    width = 1 / len(bins)
    used = bins[bins["count"] > 0]
    centres = (used["bin"] + 0.5) * width
    axes.bar(
        centres,
        used["accuracy"],
        width=width,
        alpha=0.7,
        edgecolor="black",
        label="accuracy in bin",
    )
    axes.scatter(
        used["confidence"],
        used["accuracy"],
        color="black",
        s=12,
        zorder=3,
        label="mean confidence in bin",
    )
    for centre, accuracy, count in zip(centres, used["accuracy"], used["count"], strict=True):
        axes.text(centre, min(accuracy, 0.9) + 0.02, f"n={count}", ha="center", fontsize=7)
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top probability)",
        ylabel="accuracy",
        title=f"Reliability diagram (test), ECE = {ece:.4f}",
    )
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def curves_figure(history: pd.DataFrame) -> Figure:
    """Training and validation loss and accuracy by epoch, side by side."""
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric in ((loss, "loss"), (accuracy, "accuracy")):
        axes.plot(history["epoch"], history[metric], marker="o", label="training")
        axes.plot(history["epoch"], history[f"val_{metric}"], marker="o", label="validation")
        axes.set(xlabel="epoch", ylabel=metric, title=f"{metric.capitalize()} by epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure


def image_grid_figure(
    images: np.ndarray, captions: Sequence[str], title: str, columns: int = 6
) -> Figure:
    """Images in a grid, each with a caption; grayscale shown in gray."""
    count = max(1, len(images))
    rows = -(-count // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(2 * columns, 2.3 * rows), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, image, caption in zip(grid.flat, images, captions, strict=False):
        shown = image[..., 0] if image.shape[-1] == 1 else image
        axes.imshow(shown, cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
        axes.set_title(caption, fontsize=8)
    if not len(images):
        grid.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    return figure
