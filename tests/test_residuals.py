"""The regression residual plot: a deterministic PNG, and the page the KFP evaluate step shows."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from handoff.plots import MAX_RESIDUAL_POINTS as MAX_POINTS
from handoff.plots import residuals_png
from handoff.residuals import residuals_html

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_residuals_png_is_the_same_bytes_for_the_same_input_for_n_and_n_by_1() -> None:
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=200).astype(np.float32)
    targets = predictions + rng.normal(scale=0.1, size=200)
    png = residuals_png(predictions, targets)
    assert png.startswith(PNG_SIGNATURE)
    assert residuals_png(predictions, targets) == png
    assert residuals_png(predictions.reshape(-1, 1), targets.reshape(-1, 1)) == png


def test_residuals_png_draws_several_outputs_and_thins_many_points() -> None:
    many = np.linspace(0, 1, 3 * MAX_POINTS).reshape(-1, 3)
    assert residuals_png(many, many[::-1]).startswith(PNG_SIGNATURE)


def test_residuals_png_refuses_predictions_and_targets_of_different_shapes() -> None:
    with pytest.raises(ValueError, match=r"same shape; found \(4, 1\) and \(4, 2\)"):
        residuals_png(np.zeros(4), np.zeros((4, 2)))


def test_residuals_html_embeds_the_png_and_escapes_the_title() -> None:
    page = residuals_html(b"png bytes", "a <b> title")
    assert page.startswith("<!doctype html>") and "a &lt;b&gt; title" in page
    assert f'src="data:image/png;base64,{base64.b64encode(b"png bytes").decode()}"' in page
