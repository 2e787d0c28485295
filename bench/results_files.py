"""Where every benchmark leaves its results: ``bench/results/<stem>.json`` and ``.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, stem: str, data: Any, table: str) -> Path:
    """Write *data* as JSON and *table* as markdown under *out*, print the table and where
    both went; return the path without its suffix."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / stem
    path.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {path}.json and {path}.md")
    return path
