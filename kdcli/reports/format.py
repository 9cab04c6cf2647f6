"""How the reports write numbers: one set of helpers shared by the export, compress and analysis
reports (Markdown, HTML and terminal alike), so that a percentage or a ratio reads the same everywhere.

Every helper takes ``None`` for "not measured" and returns :data:`DASH` for it. Torch-free.
"""

from __future__ import annotations

DASH = "–"  # not measured / not applicable


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage: ``0.9051`` → ``"90.51%"``."""
    return DASH if x is None else f"{100 * x:.{digits}f}%"


def ratio(x: float | None, digits: int = 3) -> str:
    """A ratio (student / teacher, a speed-up): ``0.25`` → ``"0.250×"``."""
    return DASH if x is None else f"{x:.{digits}f}×"


def ms(x: float | None, unit: bool = False) -> str:
    """A latency in milliseconds: ``"0.123"`` (``unit=True``: ``"0.123 ms"``)."""
    if x is None:
        return DASH
    return f"{x:.3f} ms" if unit else f"{x:.3f}"


def mb(n: int | None) -> str:
    """A size in bytes in decimal megabytes: ``2_500_000`` → ``"2.50 MB"``."""
    return DASH if n is None else f"{n / 1e6:.2f} MB"


def binary_size(n: int | None) -> str:
    """A size in bytes in KiB below 1 MiB, else MiB: ``"3.0 KiB"``, ``"1.50 MiB"``."""
    if n is None:
        return DASH
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def count(n: int | None) -> str:
    """A count (parameters, MACs) with a k / M / G suffix: ``8640`` → ``"8.64k"``."""
    if n is None:
        return DASH
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{suf}"
    return str(n)


def integer(n: int | float | None) -> str:
    """An integer with thousands separators: ``1234`` → ``"1,234"``."""
    return DASH if n is None else f"{int(n):,}"


def per_second(x: float | None) -> str:
    """A throughput, whole samples per second with thousands separators: ``"12,345"``."""
    return DASH if x is None else f"{x:,.0f}"


def sci(x: float | None) -> str:
    """A small difference in scientific notation: ``3.1e-07`` → ``"3.10e-07"``."""
    return DASH if x is None else f"{x:.2e}"
