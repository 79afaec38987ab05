"""PNG pictures for the readiness report: confusion matrix, training curves, latency histogram.

Figures are drawn with matplotlib's ``Figure`` and the Agg canvas directly rather than pyplot, so
nothing here selects a backend or keeps figures alive for whoever else imports matplotlib in the
same process. PNGs are written without the "Software" stamp, so the same input gives the same
bytes and reports diff cleanly.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

FIGSIZE = (5.0, 4.0)
DPI = 100
MAX_ANNOTATED_CLASSES = 20  # beyond this the numbers overlap and hide the colours
MAX_RESIDUAL_POINTS = 5000  # beyond this the points are one blot and the PNG only grows


def _new_figure() -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _nothing_to_show(fig: Figure, message: str) -> bytes:
    """A report should still render when a step had nothing to plot, so say so in the picture."""
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def confusion_png(confusion: list[list[int]], labels: list[str]) -> bytes:
    """Heatmap of the confusion matrix, rows the true class, columns the predicted class."""
    fig = _new_figure()
    if not confusion and not labels:
        return _nothing_to_show(fig, "no confusion matrix (regression task)")
    matrix = np.asarray(confusion, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(labels):
        raise ValueError(
            f"confusion must be a square matrix with one row per label; "
            f"found shape {matrix.shape} and {len(labels)} labels"
        )
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=90 if len(labels) > 10 else 0)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    if len(labels) <= MAX_ANNOTATED_CLASSES:
        threshold = matrix.max() / 2
        size = 8 if len(labels) > 10 else 10
        for (row, col), count in np.ndenumerate(matrix):
            colour = "white" if count > threshold else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=size)
    return _png(fig)


def _plot_lines(ax: Axes, history: dict[str, list[tuple[int, float]]], names: list[str]) -> None:
    for name in names:
        points = sorted(history[name])
        steps = [step for step, _ in points]
        values = [value for _, value in points]
        ax.plot(steps, values, marker="o" if len(points) <= 20 else None, markersize=3, label=name)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def curves_png(history: dict[str, list[tuple[int, float]]], x_label: str = "epoch") -> bytes:
    return _png(curves_figure(history, x_label))


def curves_figure(history: dict[str, list[tuple[int, float]]], x_label: str = "epoch") -> Figure:
    """One line per metric over ``x_label`` (what the history's steps count: the trainer logs one
    point per epoch); losses get their own panel.

    Losses and 0-1 metrics live on different scales; on one axis the metrics flatten into a line.
    """
    fig = _new_figure()
    names = sorted(name for name, points in history.items() if points)
    if not names:
        _nothing_to_show(fig, "no training history recorded")
        return fig
    losses = [name for name in names if "loss" in name.lower()]
    others = [name for name in names if name not in losses]
    groups = [(group, label) for group, label in ((losses, "loss"), (others, "metric")) if group]
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (group, label) in zip(axes, groups, strict=True):
        _plot_lines(ax, history, group)
        ax.set_ylabel(label)
    axes[-1].set_xlabel(x_label)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs (and steps) are whole numbers
    axes[0].set_title("training curves")
    return fig


def residuals_png(predictions: np.ndarray, targets: np.ndarray, items: int | None = None) -> bytes:
    """Residuals against predictions, one colour per output column, with the zero line.

    ``predictions`` and ``targets`` as the evaluation suite scores them: (N,) or (N, k), the same
    shape. More than ``MAX_RESIDUAL_POINTS`` items are thinned evenly, so the same input gives the same bytes.
    ``items`` is how many held-out items they were drawn from (default: all of them).
    """
    preds = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)
    truth = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    if preds.shape != truth.shape:
        raise ValueError(
            f"predictions and targets must have the same shape; found {preds.shape} and {truth.shape}"
        )
    if len(preds) > MAX_RESIDUAL_POINTS:
        keep = np.linspace(0, len(preds) - 1, MAX_RESIDUAL_POINTS).astype(np.int64)
        preds, truth = preds[keep], truth[keep]
    fig = _new_figure()
    ax = fig.add_subplot()
    for column in range(preds.shape[1]):
        label = f"output {column}" if preds.shape[1] > 1 else None
        ax.scatter(preds[:, column], truth[:, column] - preds[:, column], s=8, alpha=0.5, label=label)
    ax.axhline(0.0, color="tab:red", linewidth=1)
    if preds.shape[1] > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("residual (target - predicted)")
    ax.set_title(f"residuals ({len(predictions) if items is None else items} held-out items)")
    ax.grid(alpha=0.3)
    return _png(fig)


def latency_histogram_png(timings_ms: Sequence[float], slo_ms: float) -> bytes:
    """Histogram of request latencies, with p50, p99 and the SLO marked so the gap is visible."""
    fig = _new_figure()
    timings = np.asarray(timings_ms, dtype=np.float64)
    if timings.size == 0:
        return _nothing_to_show(fig, "no latency measurements")
    p50, p99 = np.percentile(timings, [50, 99])
    ax = fig.add_subplot()
    ax.hist(timings, bins=30, color="tab:blue", alpha=0.7)
    ax.axvline(p50, color="tab:green", linestyle=":", label=f"p50 {p50:.2f} ms")
    ax.axvline(p99, color="tab:orange", linestyle="--", label=f"p99 {p99:.2f} ms")
    top = float(timings.max())
    if slo_ms <= 3 * top:
        ax.axvline(slo_ms, color="tab:red", linewidth=2, label=f"SLO {slo_ms:g} ms")
    else:  # far off to the right: drawing it would squeeze the histogram into one bar
        ax.set_xlim(0, top * 1.15)
        ax.set_title(f"SLO {slo_ms:g} ms is off the scale, {slo_ms / p99:.0f}x p99", fontsize=9, loc="right")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title("latency", loc="left")
    ax.legend(fontsize=8)
    return _png(fig)


def forms_latency_png(forms: Sequence[tuple[str, float, float, bool]], served: str) -> bytes:
    """p50 and p99 of each form optimize measured (name, p50, p99, kept), the served one marked:
    how much faster it is than fp32, at what tail."""
    fig = _new_figure()
    if not forms:
        return _nothing_to_show(fig, "no form was measured")
    ax = fig.add_subplot()
    names = [f"{name} (served)" if name == served else name for name, *_ in forms]
    y = np.arange(len(forms))
    ax.barh(y - 0.2, [f[1] for f in forms], height=0.4, color="tab:green", label="p50")
    ax.barh(y + 0.2, [f[2] for f in forms], height=0.4, color="tab:orange", label="p99")
    for row, (_, _, p99, kept) in enumerate(forms):
        if not kept:
            ax.annotate(
                "not kept",
                (p99, row + 0.2),
                fontsize=7,
                va="center",
                xytext=(3, 0),
                textcoords="offset points",
            )
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("latency (ms) at the contract's batch size")
    ax.set_title("optimized forms", loc="left")
    ax.legend(fontsize=8)
    return _png(fig)
