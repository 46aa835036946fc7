"""One document model and one renderer for every report (run, privacy, classification, study).

A report builder fills a :class:`Document` with blocks (headings, paragraphs, notes, key-value lists,
tables, figures) and writes it once: ``report.md`` (GitHub-flavoured Markdown) and ``report.html``
(one page, inline CSS, no script, no external resource) then hold the same content in the same order.
The HTML comes from one Jinja2 template (autoescaped), so its layout is read and changed in one place.

Tables are cleaned the same way in both files: a column whose body cells are all empty is dropped, and
columns whose cells all read as numbers are right-aligned unless the builder says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from markupsafe import Markup

__all__ = [
    "Document",
    "Heading",
    "Image",
    "KeyValues",
    "Note",
    "Paragraph",
    "Table",
    "render_html",
    "render_markdown",
    "render_markdown_table",
]


@dataclass
class Heading:
    level: int
    text: str
    kind: ClassVar[str] = "heading"


@dataclass
class Paragraph:
    text: str
    kind: ClassVar[str] = "paragraph"


@dataclass
class Note:
    """A remark set apart from the text (a skipped section, a caveat)."""

    text: str
    kind: ClassVar[str] = "note"


@dataclass
class KeyValues:
    """A list of ``(key, value)`` items, e.g. numbered recommendations."""

    items: list[tuple[str, str]]
    kind: ClassVar[str] = "keyvalues"


_NUMBER = re.compile(r"[-+−]?(\d[\d,]*(\.\d+)?|\.\d+)([eE][-+]?\d+)?\s*(%|MB|s|×)?")
_NOT_A_NUMBER = frozenset({"", "n/a", "-", "inf", "∞"})


def looks_numeric(text: str) -> bool:
    """Whether a cell reads as a number (with a unit), or as one of the placeholders of a numeric column."""
    return text.strip() in _NOT_A_NUMBER or _NUMBER.fullmatch(text.strip()) is not None


@dataclass
class Table:
    """A table; ``numeric`` marks right-aligned columns (None: the columns whose cells all read as numbers)."""

    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] | None = None
    emphasize_last: bool = False  # a Total / Mean row
    caption: str | None = None
    kind: ClassVar[str] = "table"

    def __post_init__(self) -> None:
        self.header = [str(h) for h in self.header]
        self.rows = [["" if c is None else str(c) for c in row] for row in self.rows]
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(f"a row of {len(row)} cells in a table of {len(self.header)} columns: {row}")
        if self.numeric is None:
            self.numeric = [
                bool(self.rows) and any(row[i].strip() for row in self.rows)
                and all(looks_numeric(row[i]) for row in self.rows)
                for i in range(len(self.header))
            ]
        elif len(self.numeric) != len(self.header):
            raise ValueError(f"{len(self.numeric)} alignment flags for {len(self.header)} columns")

    def alignments(self) -> list[str]:
        """The CSS class of each column: "num" (right-aligned) or "text"."""
        return ["num" if numeric else "text" for numeric in self.numeric]  # type: ignore[union-attr]

    def shown(self) -> Table:
        """The table without its empty columns (every body cell blank); the first column always stays."""
        keep = [i for i in range(len(self.header)) if i == 0 or any(row[i].strip() for row in self.rows)]
        if len(keep) == len(self.header) or not self.rows:
            return self
        return Table([self.header[i] for i in keep], [[row[i] for i in keep] for row in self.rows],
                     [self.numeric[i] for i in keep], self.emphasize_last, self.caption)  # type: ignore[index]


@dataclass
class Image:
    """A figure: ``src`` relative to the report's folder."""

    src: str
    caption: str
    kind: ClassVar[str] = "image"


Block = Heading | Paragraph | Note | KeyValues | Table | Image


@dataclass
class Document:
    """A titled list of blocks, written as ``report.md`` and ``report.html``."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def heading(self, text: str, level: int = 2) -> None:
        self.add(Heading(level, text))

    def paragraph(self, text: str) -> None:
        self.add(Paragraph(text))

    def note(self, text: str) -> None:
        self.add(Note(text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None,
              caption: str | None = None, emphasize_last: bool = False) -> None:
        self.add(Table(list(header), [list(row) for row in rows], None if numeric is None else list(numeric),
                       emphasize_last, caption))

    def figure(self, src: str, caption: str) -> None:
        self.add(Image(src, caption))

    def markdown(self) -> str:
        return render_markdown(self)

    def html(self) -> str:
        return render_html(self)

    def write(self, out_dir: Path | str) -> tuple[Path, Path]:
        """Write ``out_dir/report.md`` and ``out_dir/report.html``; returns both paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
        markdown_path.write_text(self.markdown(), encoding="utf-8")
        html_path.write_text(self.html(), encoding="utf-8")
        return markdown_path, html_path


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown_table(table: Table) -> list[str]:
    """The pipe-table lines of ``table`` (empty columns dropped), caption in italics above."""
    table = table.shown()
    lines = [f"*{table.caption}*", ""] if table.caption else []
    lines.append("| " + " | ".join(_md_cell(h) for h in table.header) + " |")
    lines.append("|" + "|".join("---:" if num else ":---" for num in table.numeric) + "|")  # type: ignore[union-attr]
    for index, row in enumerate(table.rows):
        cells = [_md_cell(c) for c in row]
        if table.emphasize_last and index == len(table.rows) - 1 and cells[0]:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(doc: Document) -> str:
    lines: list[str] = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Note):
            lines += [f"> Note: {block.text}", ""]
        elif isinstance(block, KeyValues):
            lines += [f"- **{key}**: {value}" for key, value in block.items] + [""]
        elif isinstance(block, Table):
            lines += [*render_markdown_table(block), ""]
        elif isinstance(block, Image):
            alt = block.caption.replace("[", "\\[").replace("]", "\\]")
            lines += [f"![{alt}]({block.src})", "", f"*{block.caption}*", ""]
        else:
            raise TypeError(f"unknown block {block!r}")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #ffffff; box-sizing: border-box; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: 8px; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 36px; }
h3 { margin-top: 24px; }
div.table { max-width: 100%; overflow-x: auto; margin: 8px 0 18px; }
table { border-collapse: collapse; font-size: 13px; }
p.caption { font-style: italic; margin: 12px 0 4px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; text-align: left; }
td { overflow-wrap: break-word; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tr.total td { font-weight: bold; background: #f6f8fa; }
p.note { color: #57606a; font-style: italic; border-left: 3px solid #d0d7de; padding-left: 10px; }
figure { margin: 12px 0 28px; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 14px; }
""".strip()

_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8" />
<meta name="viewport" content="width=device-width, initial-scale=1" />
<title>{{ doc.title }}</title>
<style>
{{ css }}
</style>
</head>
<body>
<main>
<h1>{{ doc.title }}</h1>
{% for block in doc.blocks %}
{% if block.kind == "heading" %}
<h{{ block.level }}>{{ block.text }}</h{{ block.level }}>
{% elif block.kind == "paragraph" %}
<p>{{ block.text }}</p>
{% elif block.kind == "note" %}
<p class="note">Note: {{ block.text }}</p>
{% elif block.kind == "keyvalues" %}
<ul>
{% for key, value in block.items %}
<li><strong>{{ key }}</strong>: {{ value }}</li>
{% endfor %}
</ul>
{% elif block.kind == "table" %}
{% set table = block.shown() %}
{% set align = table.alignments() %}
{% if table.caption %}
<p class="caption">{{ table.caption }}</p>
{% endif %}
<div class="table">
<table>
<thead>
<tr>{% for cell in table.header %}<th class="{{ align[loop.index0] }}">{{ cell }}</th>{% endfor %}</tr>
</thead>
<tbody>
{% for row in table.rows %}
<tr{% if table.emphasize_last and loop.last %} class="total"{% endif %}>\
{% for cell in row %}<td class="{{ align[loop.index0] }}">{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
</div>
{% elif block.kind == "image" %}
<figure>
<img src="{{ block.src }}" alt="{{ block.caption }}" />
<figcaption>{{ block.caption }}</figcaption>
</figure>
{% endif %}
{% endfor %}
</main>
</body>
</html>
"""

_ENVIRONMENT = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True,
                                  undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_PAGE = _ENVIRONMENT.from_string(_TEMPLATE)


def render_html(doc: Document) -> str:
    for block in doc.blocks:
        if getattr(block, "kind", None) not in ("heading", "paragraph", "note", "keyvalues", "table", "image"):
            raise TypeError(f"unknown block {block!r}")
    return _PAGE.render(doc=doc, css=Markup(CSS))  # the CSS is ours: not escaped
