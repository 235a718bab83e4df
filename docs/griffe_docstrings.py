"""A griffe extension for the documentation site: docstrings written as plain text and
reStructuredText, rendered as Markdown.

* Display math ``.. math::`` followed by an indented block, and inline ``:math:`...```,
  become the ``$$ ... $$`` and ``$...$`` that ``pymdownx.arithmatex`` passes to KaTeX.
* The notes' notation ``B[M, z](v)`` would be a Markdown link to ``v``: a ``[`` right after a
  letter, digit or ``]`` (outside code and math) is escaped, so it stays text. Real links,
  which follow a space or an opening bracket, are untouched.

Loaded by the ``extensions`` option of mkdocstrings in ``mkdocs.yml``.
"""
from __future__ import annotations

import re

import griffe

_INLINE = re.compile(r":math:`([^`]+)`")
_PROTECTED = re.compile(r"(``.+?``|`[^`]+`|\$\$.+?\$\$|\$[^$\n]+\$)", re.S)
_INDEXING = re.compile(r"(?<=[\w\]])\[")


def escape_indexing(text: str) -> str:
    """Escape ``[`` after a word character or ``]``, outside code (spans, fenced blocks, blocks
    indented by four spaces after a blank line) and math (``$...$``, ``$$`` blocks)."""
    out, fenced, code, blank = [], False, False, True
    for line in text.splitlines():
        indent, stripped = len(line) - len(line.lstrip()), line.strip()
        fence = stripped.startswith("```") or stripped == "$$"
        fenced ^= fence
        code = bool(stripped) and indent >= 4 and (blank or code)
        if not (fenced or fence or code):
            parts = _PROTECTED.split(line)
            line = "".join(p if k % 2 else _INDEXING.sub(r"\\[", p) for k, p in enumerate(parts))
        out.append(line)
        blank = not line.strip()
    return "\n".join(out)


def to_markdown(text: str) -> str:
    """RST math to ``$$``/``$`` math, then ``escape_indexing``."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(".. math::"):
            indent = len(line) - len(stripped)
            body = [stripped[len(".. math::"):].strip()]
            i += 1
            while i < len(lines) and (not lines[i].strip()
                                      or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i].strip())
                i += 1
            pad = " " * indent
            out += ["", pad + "$$", *(pad + b for b in body if b), pad + "$$", ""]
            continue
        out.append(_INLINE.sub(r"$\1$", line))
        i += 1
    return escape_indexing("\n".join(out))


class DocstringMarkdown(griffe.Extension):
    """Rewrite every docstring as it is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
