"""Facts about this machine that budgets are made of."""

from __future__ import annotations

import os


def memory_fraction(fraction: float, fallback: int = 4 << 30) -> int:
    """`fraction` of this machine's physical memory in bytes (`fallback` if unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return fallback
    return int(total * fraction) if total > 0 else fallback
