"""The residual plot of a regression model: what it draws, kept while the held-out split streams
past (``ResidualSample``), and the plot as a KFP HTML artifact (the one kind of picture the KFP UI
renders). The plot itself is ``handoff.plots.residuals_png``, in the readiness report too.
"""

from __future__ import annotations

import base64
import html

import numpy as np

RESIDUALS_PNG = "residuals.png"
# Kept for the plot: plots.residuals_png thins whatever it is given to its own MAX_RESIDUAL_POINTS
# (5000); keeping up to twice that lets a split of up to 10000 items be drawn from all of them.
MAX_POINTS = 5000


class ResidualSample:
    """The (prediction, target) pairs a residual plot draws, kept while a split streams past.

    Every item is kept up to ``2 * MAX_POINTS``; beyond that every other kept item is dropped and
    the stride between kept items doubles, so what is kept is evenly spread over the split and
    never more than ``2 * MAX_POINTS`` rows, whatever its size. A split of up to that many items
    is drawn exactly as from whole arrays.
    """

    def __init__(self) -> None:
        self.items = 0  # every item seen, kept or not
        self.stride = 1
        self._predictions: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        self._kept = 0

    def add(self, predictions: np.ndarray, targets: np.ndarray) -> None:
        preds = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)
        truth = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
        first = (-self.items) % self.stride  # the first index in this batch on the stride
        self._predictions.append(preds[first :: self.stride])
        self._targets.append(truth[first :: self.stride])
        self._kept += len(self._predictions[-1])
        self.items += len(preds)
        while self._kept > 2 * MAX_POINTS:
            preds, truth = self.arrays()
            self.stride *= 2
            self._predictions, self._targets = [preds[::2]], [truth[::2]]
            self._kept = len(self._predictions[0])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(predictions, targets) kept, as (n, k) arrays."""
        if not self._predictions:
            return np.zeros((0, 1)), np.zeros((0, 1))
        return np.concatenate(self._predictions), np.concatenate(self._targets)


def residuals_html(png: bytes, title: str) -> str:
    """A self-contained page showing ``png`` (what a KFP HTML artifact needs)."""
    data = base64.b64encode(png).decode("ascii")
    name = html.escape(title)
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{name}</title></head>\n'
        f'<body><h1>{name}</h1><img alt="residuals against predictions" '
        f'src="data:image/png;base64,{data}"></body></html>\n'
    )
