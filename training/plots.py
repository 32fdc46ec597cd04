"""Figures logged with every training run (the confusion matrix, the training curves) and with every gate
decision (the per-class change of candidate against champion, with intervals).

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot, no global state, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from training.evaluate import EvalReport
    from training.gate import GateDecision


def confusion_matrix_figure(report: EvalReport, *, title: str = "Validation confusion matrix") -> Figure:
    """A heat map of ``report.confusion`` with counts in the cells (rows: true label, columns: predicted)."""
    import numpy as np
    from matplotlib.figure import Figure

    matrix = np.asarray(report.confusion, dtype=np.int64)
    n = len(report.labels)
    side = max(4.0, 0.6 * n + 2.0)
    figure = Figure(figsize=(side, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xticks(range(n), report.labels, rotation=45, ha="right")
    axes.set_yticks(range(n), report.labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{title} (accuracy {report.accuracy:.3f}, macro F1 {report.macro_f1:.3f})")
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(n):
        for col in range(n):
            axes.text(
                col,
                row,
                str(matrix[row, col]),
                ha="center",
                va="center",
                color="white" if matrix[row, col] > threshold else "black",
            )
    return figure


def training_curves_figure(
    history: Mapping[str, Sequence[float]], *, phase_starts: Mapping[str, int]
) -> Figure:
    """Loss and accuracy per epoch (train and validation) across phases, phase starts marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    for position, metric in enumerate(("loss", "accuracy"), start=1):
        axes = figure.add_subplot(1, 2, position)
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = list(history.get(key, []))
            if values:
                axes.plot(range(1, len(values) + 1), values, style, marker="o", markersize=3, label=key)
        for phase, start in phase_starts.items():
            axes.axvline(start + 0.5, color="grey", linewidth=0.8, linestyle=":")
            axes.annotate(phase, (start + 0.6, 0.02), xycoords=("data", "axes fraction"), color="grey")
        axes.set_xlabel("epoch")
        axes.set_title(metric)
        axes.legend()
    return figure


def class_change_figure(decision: GateDecision) -> Figure:
    """Per class: candidate minus champion accuracy on the test items with its interval, the margin as a
    dashed line; red for a failed class, grey for a class with too few items to decide."""
    from matplotlib.figure import Figure

    checks = decision.class_checks()
    figure = Figure(figsize=(8, max(2.5, 0.45 * len(checks) + 1.5)), layout="constrained")
    axes = figure.add_subplot()
    for row, check in enumerate(checks):
        if check.skipped or check.difference is None or check.ci_low is None or check.ci_high is None:
            axes.annotate(f"{check.count} items: not used", (0, row), color="grey", va="center", ha="center")
            continue
        color = "tab:blue" if check.passed else "tab:red"
        axes.errorbar(
            check.difference,
            row,
            xerr=[[check.difference - check.ci_low], [check.ci_high - check.difference]],
            fmt="o",
            color=color,
            capsize=4,
        )
    margin = decision.policy.max_class_accuracy_drop
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.axvline(-margin, color="tab:red", linewidth=0.8, linestyle="--", label=f"margin -{margin:.2f}")
    axes.set_yticks(range(len(checks)), [f"{c.name[6:]} ({c.count})" for c in checks])
    axes.set_xlim(-1.05, 1.05)
    axes.set_xlabel(f"candidate - champion accuracy ({decision.policy.confidence:.0%} interval)")
    axes.set_title("Per-class change on the test items: " + ("PASSED" if decision.passed else "REFUSED"))
    axes.legend(loc="lower right")
    return figure
