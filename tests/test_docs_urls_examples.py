"""The urls.txt examples of the README and docs/directories.md parse, and mean what they say.

A code block whose lines are URL lines, indented header/option lines and comments is a
urls.txt example; each must parse as written (an inline ``# comment`` after a URL, say, would
silently become a PATH).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from remotefs.config.manifest import ManifestEntry, parse_manifest_text

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^( *)```\n(.*?)^\1```", re.DOTALL | re.MULTILINE)


def urls_blocks(document: Path) -> list[str]:
    """The code blocks of *document* that are urls.txt contents."""
    found = []
    for indent, body in BLOCK.findall(document.read_text()):
        lines = [line[len(indent) :] for line in body.splitlines()]
        content = [line for line in lines if line.strip() and not line.startswith("#")]
        if any("fuse.remotefs" in line for line in content):
            continue  # an fstab line, not a urls.txt
        if content and all(
            line.startswith(("http://", "https://")) or line.startswith((" ", "\t"))
            for line in content
        ):
            found.append("\n".join(lines) + "\n")
    return found


@pytest.mark.parametrize("document", ["README.md", "docs/directories.md"])
def test_every_urls_txt_example_parses(document: str) -> None:
    blocks = urls_blocks(ROOT / document)
    assert blocks, f"{document} has no urls.txt example"
    for block in blocks:
        entries = parse_manifest_text(block, document)
        assert entries


def test_the_directory_example_means_what_the_text_says() -> None:
    (block,) = [b for b in urls_blocks(ROOT / "docs/directories.md") if "isos/" in b]
    entries: dict[str, ManifestEntry] = {
        "/".join(e.path): e for e in parse_manifest_text(block, "docs")
    }
    assert entries[""].directory is not None  # the mount root
    isos = entries["isos"].directory
    assert isos is not None and isos.depth == 2 and isos.include == ("*.iso",)
    assert isos.checksums == ("https://host/isos/SHA256SUMS",)
    assert entries["data"].headers == (("Authorization", "Bearer TOKEN"),)
    assert dict(entries["tools/setup.bin"].digests)["sha256"].startswith("9f86d0")
