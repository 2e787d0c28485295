"""Sizes as people read them, the same in every place that shows one (status, pages, logs)."""

from __future__ import annotations


def human_size(count: float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, one decimal, whole bytes below 1 KiB."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            break
    return f"{count:.1f} {unit}"
