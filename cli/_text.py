"""Data as text for people: wrapped to the terminal, highlighted, never parsed as rich markup.

Every function takes data (chunk texts, document ids, file names) and returns or prints
`rich.text.Text`, which rich renders literally, so `[bold]` in a document stays `[bold]`.
"""

from __future__ import annotations

import re


def flat(s: str) -> str:
    """Whitespace runs as one space, so a chunk reads as one paragraph in a table cell (JSON keeps it exact)."""
    return " ".join(s.split())


def print_wrapped(console, text, indent: int) -> None:
    """Print `text` wrapped to the console's width (80 when not a terminal), every line indented, no trailing
    spaces."""
    from rich.text import Text

    for line in text.wrap(console, max(20, console.width - indent)):
        line.rstrip()
        console.print(Text(" " * indent) + line, soft_wrap=True)


def highlighted(text: str, span, style: str = ""):
    """`text` with whitespace runs as one space (a paragraph that wraps) and the characters of `span`
    ([start, end) in the original text) in reverse video."""
    from rich.text import Text

    out = Text(style=style)
    a, b = span or (0, 0)
    for m in re.finditer(r"\S+|\s+", text.strip()):
        start = m.start() + (len(text) - len(text.lstrip()))
        piece = m.group() if not m.group().isspace() else " "
        hot = span and start < b and start + len(m.group()) > a
        if hot and not m.group().isspace():
            lo, hi = max(a - start, 0), min(b - start, len(piece))
            out.append(piece[:lo])
            out.append(piece[lo:hi], style="reverse bold")
            out.append(piece[hi:])
        else:
            out.append(piece, style="reverse bold" if hot and a < start and start + 1 <= b else "")
    return out


def label(path: str, width: int = 32) -> str:
    """A file name for a table cell: relative to the working directory when below it, and at most `width`
    characters (the end kept, since it names the file)."""
    import os

    rel = os.path.relpath(path) if os.path.isabs(path) else path
    if not rel.startswith(".."):
        path = rel
    return path if len(path) <= width else "…" + path[-(width - 1):]
