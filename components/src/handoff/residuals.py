"""The residual plot of a regression model as a KFP HTML artifact (the one kind of picture the
KFP UI renders). The plot itself is ``handoff.plots.residuals_png``, in the readiness report too.
"""

from __future__ import annotations

import base64
import html

RESIDUALS_PNG = "residuals.png"


def residuals_html(png: bytes, title: str) -> str:
    """A self-contained page showing ``png`` (what a KFP HTML artifact needs)."""
    data = base64.b64encode(png).decode("ascii")
    name = html.escape(title)
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{name}</title></head>\n'
        f'<body><h1>{name}</h1><img alt="residuals against predictions" '
        f'src="data:image/png;base64,{data}"></body></html>\n'
    )
