"""The README's marked code blocks, for tests that run them as written.

A block is marked by an HTML comment line ``<!-- NAME ... -->`` right before its fence, so
the README renders unchanged and a test finds exactly the text a reader copies.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(name: str, readme: Path = README) -> str:
    """The code block after the ``<!-- NAME -->`` or ``<!-- NAME: note -->`` line."""
    text = readme.read_text()
    marker = re.compile(rf"^<!-- {re.escape(name)}(?:[: ][^\n]*)? -->\n", re.MULTILINE)
    found = list(marker.finditer(text))
    assert len(found) == 1, f"README.md must mark exactly one block <!-- {name} -->: {len(found)}"
    rest = text[found[0].end() :]
    fence = re.match(r"```[a-z]*\n(.*?)^```\n", rest, re.DOTALL | re.MULTILINE)
    assert fence is not None, f"<!-- {name} --> in README.md is not right before a ``` block"
    return fence.group(1)


def command_lines(block: str) -> list[str]:
    """The block's commands: each line without its trailing ``# comment`` and blank lines."""
    lines = []
    for line in block.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            lines.append(command)
    return lines
