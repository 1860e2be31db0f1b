"""Markdown tables and matplotlib figures shared by the evaluation and audit reports."""
from __future__ import annotations

import io
from typing import Any


def markdown_cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in rows]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """A figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()
