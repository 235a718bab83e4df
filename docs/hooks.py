"""MkDocs hook: the API table of every module, generated from the registry at build time.

The marker comment ``<!-- registry-table ... -->`` in a page is replaced by
``jbackprop.modules.registry.markdown_table()``, so a module declared in the registry appears in
the documentation without editing any page. Loaded by ``hooks:`` in ``mkdocs.yml``.
"""
from __future__ import annotations

import re

_MARKER = re.compile(r"<!-- registry-table[^>]*-->")


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 — MkDocs' hook signature
    if not _MARKER.search(markdown):
        return markdown
    from jbackprop.modules import registry
    return _MARKER.sub(lambda _: registry.markdown_table(), markdown)
