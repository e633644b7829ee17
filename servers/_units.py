"""Formatting sizes and rates for people."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(count: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.0 MiB``, ``2.1 GiB`` (binary units)."""
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{int(count)} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
