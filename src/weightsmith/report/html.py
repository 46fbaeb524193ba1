"""Pieces every self-contained HTML report shares: the style sheet, number formatting,
matplotlib figures as embedded PNGs, and the page around the parts.

Reports have no external URLs and no JavaScript; strings from runs are escaped by callers
through `fmt` or `html.escape`.
"""

from __future__ import annotations

import base64
import io
import math
from html import escape
from pathlib import Path
from typing import Any

from weightsmith.files import write_text_atomic

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.def { color: #555; font-size: 0.9em; max-width: 32em; }
.up { color: #1a7f37; } .down { color: #c62828; } .muted { color: #888; }
pre { white-space: pre-wrap; max-width: 60em; background: #f7f7f7; padding: 0.4em; margin: 0; }
"""


def fmt(x: Any, digits: int = 4) -> str:
    """A number to `digits` significant digits, a dash for missing values, other values escaped."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return escape(str(x))
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def plain(text: str) -> str:
    """Text for a matplotlib label: a "$" would start mathtext."""
    return text.replace("$", r"\$")


def new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    return Figure(figsize=(width, height))


def figure_png(fig: Any) -> str:
    """The figure as base64 PNG text for a data: URI."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image(png: str, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{png}">'


def write_page(path: Path, title: str, parts: list[str]) -> None:
    """A complete page (title, style, parts) written atomically to `path`."""
    head = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
        f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>",
    ]
    write_text_atomic(Path(path), "\n".join([*head, *parts, "</body></html>\n"]))
