"""Notebook views of results (``_repr_html_``): a summary table and, where there are filters, a grid of them as an
inline PNG. Registered in ``defaults.HTML_VIEWS``, which the results' ``_repr_html_`` reads (they sit in parts
below this one); every view is one screen: at most ``SHOWN`` filters and ``ROWS`` table rows."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from ..defaults import HTML_VIEWS
from .render import filter_grid

SHOWN = 32  # filters drawn in a grid
ROWS = 10  # rows of a table
CELL = 40  # pixels of a grid cell


def _table(rows, header=None) -> str:
    head = "" if header is None else "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _grid(filters, neurons) -> str:
    """Up to ``SHOWN`` filters as an inline PNG, each labelled with its neuron."""
    shown = np.asarray(filters[:SHOWN])
    if shown.ndim != 4 or 0 in shown.shape:
        return ""
    image = filter_grid(np.nan_to_num(shown), [str(int(n)) for n in neurons[: len(shown)]], cell=CELL)
    data = io.BytesIO()
    image.save(data, format="PNG")
    more = f"<br><small>first {len(shown)} of {len(filters)} neurons</small>" if len(filters) > len(shown) else ""
    return f'<img src="data:image/png;base64,{base64.b64encode(data.getvalue()).decode()}"/>{more}'


def _title(text: str) -> str:
    return f"<b>{html.escape(text)}</b>"


def decoded_view(decoded) -> str:
    first = repr(decoded).splitlines()
    rows = [("mode", decoded.mode), ("layer", decoded.layer), ("neurons", len(decoded.neurons)),
            ("filters", f"{list(decoded.filters.shape)} {decoded.filters.dtype}"), ("stride", tuple(decoded.stride)),
            ("origin", tuple(decoded.origin)), ("exact at", decoded.exact_at)]
    if decoded.plan is not None:
        rows.append(("route", getattr(decoded.plan, "route", "")))
    return _title(first[0]) + _table(rows) + _grid(decoded.filters, decoded.neurons)


def top_view(top) -> str:
    first = repr(top).splitlines()
    rows = []
    for i, neuron in enumerate(top.neurons[:ROWS]):
        slots = [(float(v), top.sources[int(j)]) for v, j in zip(top.values[i, :3], top.image_index[i, :3]) if j >= 0]
        rows.append((int(neuron), *(f"{v:.4g} ({s})" for v, s in slots)))
    header = ("neuron", *(f"top {r + 1}" for r in range(min(3, top.top))))
    return _title(first[0]) + _table([(line.strip(),) for line in first[1:]]) + _table(rows, header)


def diff_view(report) -> str:
    first = repr(report).splitlines()[0]
    rows = [(d.layer_a, len(d.neurons), f"{d.worst:.3g}", "; ".join(d.failures) or "-") for d in report.layers[:ROWS]]
    body = _table(rows, ("layer", "neurons", "filter drift (max)", "limits crossed"))
    if len(report.layers) > ROWS:
        body += f"<small>{len(report.layers) - ROWS} more layers, less changed</small>"
    return _title(first) + body


def comparison_view(comparison) -> str:
    first = repr(comparison).splitlines()[0]
    parts = [_title(first)]
    for mode, decoded in list(comparison.decoded.items())[:6]:
        parts.append(f"<div>{html.escape(mode)}</div>" + _grid(decoded.filters[:8], decoded.neurons))
    return "".join(parts)


HTML_VIEWS.update(Decoded=decoded_view, TopN=top_view, DiffReport=diff_view, LayerComparison=comparison_view)
