"""Formatting shared by the report, the study and the speed tables: markdown and HTML tables, HTML escaping, the
style sheet of the self-contained HTML pages, matplotlib figures rendered to PNG bytes without pyplot, and the
slug that turns a name into a file or folder name."""

from __future__ import annotations

import html
import io
import re


def markdown_table(header: list[str], rows: list[list[str]], right: range | None = None) -> str:
    """A padded markdown table (readable as plain text too); columns in `right` (default: all but the first)
    are right-aligned."""
    right = range(1, len(header)) if right is None else right
    cells = [[markdown_cell(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def markdown_cell(text) -> str:
    """One cell's text, safe inside a markdown table row."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.9em; }
.verdict { background: #eef6ff; border-left: 5px solid #1f77b4; padding: 0.8em 1em; font-size: 1.1em; }
.significance li { margin: 0.3em 0; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.examples td { max-width: 260px; font-size: 0.9em; white-space: pre-wrap; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def esc(text) -> str:
    """Text escaped for HTML, quotes included."""
    return html.escape(str(text), quote=True)


def html_table(header: list[str], rows: list[list[str]], *, table_id: str | None = None,
               css_class: str | None = None, numeric: range | None = None) -> str:
    """An HTML table; columns in `numeric` (default: all but the first) are right-aligned."""
    numeric = range(1, len(header)) if numeric is None else numeric
    attrs = (f' id="{esc(table_id)}"' if table_id else "") + (f' class="{esc(css_class)}"' if css_class else "")
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table{attrs}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def figure(rows: int = 1):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend switch)."""
    # imported here: matplotlib costs seconds, and most users of the tables never draw
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.0 + 2.2 * (rows - 1)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]


def png(fig) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def slug(text: str, empty: str = "x") -> str:
    """A name safe in file and folder names: runs of anything but ASCII letters and digits become one "-", in
    lower case; `empty` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or empty
