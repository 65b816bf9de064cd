"""The pieces every secateurs HTML page is made of: one stylesheet, escaping, figures, tables.

Both pages, the benchmark report (:mod:`secateurs.report.bench_html`) and a run's report
(:mod:`secateurs.report.run_html`), are self-contained: inline CSS, plots as PNGs in ``data:``
URIs, no script and no URL to fetch, so a page can be mailed or archived as one file. Each plot
is an ``<img>`` in a ``<figure>`` with an ``id`` and a ``<figcaption>``; a plot without data keeps
its figure and says why instead.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1.5em 0; padding: .5em; border: 1px solid #e4e4e4; border-radius: 4px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: .9em; color: #444; margin-top: .4em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; vertical-align: top; }
td { white-space: nowrap; }
th { background: #f4f4f4; }
td.l, th.l { text-align: left; }
.nm { color: #888; font-style: italic; }
.n1 { color: #a60; font-size: .85em; }
.scroll { overflow-x: auto; }
details { margin: .5em 0; }
summary { cursor: pointer; font-weight: 600; }
code, pre { background: #f4f4f4; padding: 0 .2em; }
pre { padding: .5em; overflow-x: auto; font-size: .85em; }
.big td, .big th { font-size: 1.15em; padding: .35em .8em; }
.why { color: #555; font-size: .9em; }
"""


def escape(text: Any) -> str:
    """``text`` as HTML text or attribute value."""
    return html.escape(str(text), quote=True)


def figure(fig_id: str, caption: str, png: bytes | None, why: str = "not measured") -> str:
    """A ``<figure>`` holding ``png`` as a ``data:`` URI, or saying ``why`` there is none."""
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        body = f'<img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
    else:
        body = f'<p class="nm">{escape(why)}</p>'
    return (
        f'<figure id="{escape(fig_id)}">{body}<figcaption>{escape(caption)}</figcaption></figure>'
    )


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    left: int = 1,
    css: str = "",
    table_id: str = "",
) -> str:
    """A table; the first ``left`` columns are left-aligned. Cells are escaped text."""
    attrs = (f' id="{escape(table_id)}"' if table_id else "") + (
        f' class="{escape(css)}"' if css else ""
    )
    head = "".join(
        f"<th{' class=l' if i < left else ''}>{escape(h)}</th>" for i, h in enumerate(headers)
    )
    body = [
        "<tr>"
        + "".join(
            f"<td{' class=l' if i < left else ''}>{escape(c)}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    ]
    return "\n".join(
        [f'<div class="scroll"><table{attrs}>', f"<tr>{head}</tr>", *body, "</table></div>"]
    )


def page(title: str, body: Sequence[str]) -> str:
    """A whole HTML document: the title, the stylesheet and ``body``'s parts in order."""
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
                f"<h1>{escape(title)}</h1>",
                *body,
                "</body></html>",
            ]
        )
        + "\n"
    )
