"""Values in Markdown files (report.md, eval.md): shown as text, never as markup.

Class names, stage errors and config values come from data and configs; put raw into Markdown, a class
named `<img src=x onerror=alert(1)>` is live HTML in any viewer that renders Markdown's inline HTML,
and `[x](javascript:...)` a link. report.html escapes them through Jinja's autoescape; Markdown
outputs go through these two.
"""

from __future__ import annotations

import re
from typing import Any

# Markdown's punctuation that could make links, images or code or end a table cell; backslash-escaped,
# which every CommonMark renderer shows as the character itself. Emphasis (* _) is left alone: it
# runs nothing, and names like rknn_board stay as written.
_MARKUP = re.compile(r"([\\`\[\]|])")
# Where HTML (a tag, a comment, a declaration) or an autolink could start; `a <= b` stays as written.
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def escape(value: Any) -> str:
    """value as Markdown text (also inside a table cell): one line, no HTML, no markup."""
    one_line = " ".join(str(value).splitlines())
    return _TAG_START.sub("&lt;", _MARKUP.sub(r"\\\1", one_line))


def code(value: Any) -> str:
    """value as an inline code span it cannot close (its fence is longer than any run of backticks
    in it); inside a code span nothing is markup or HTML. A `|` would still end a table cell: `\\|`."""
    one_line = " ".join(str(value).splitlines()).replace("|", "\\|")
    if not one_line:
        return ""  # `` is no code span: it would show as two backticks
    fence = "`" * (max((len(run) for run in re.findall(r"`+", one_line)), default=0) + 1)
    pad = " " if one_line.startswith("`") or one_line.endswith("`") else ""
    return f"{fence}{pad}{one_line}{pad}{fence}"
