"""Numbers for people: byte counts and durations as short strings."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Bytes in decimal units: 3_200_000 → '3.2 MB'."""
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def human_seconds(s: float) -> str:
    """Durations: '8.4 s', '3m 05s', '2h 07m'."""
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"
