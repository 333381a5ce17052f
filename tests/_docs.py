"""Code blocks of the docs, for the tests that run them (a block's first line names it: ``# lightning``)."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def doc_block(doc: str, name: str | None = None) -> str:
    """The python code block of ``docs/<doc>`` whose first line is ``# <name>`` (or the only one)."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / doc).read_text(), re.S)
    if name is None:
        assert len(blocks) == 1, f"{doc} has {len(blocks)} python blocks"
        return blocks[0]
    found = [b for b in blocks if b.splitlines()[0].strip() == f"# {name}"]
    assert len(found) == 1, f"{doc}: no single python block starting with '# {name}'"
    return found[0]
