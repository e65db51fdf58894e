"""Progress with rate and ETA for long work, as log lines (Dagster) or a bar (CLI)."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLogger:
    """Calls `emit` with 'done/total, rate, ETA' at most every `every` seconds, and once at the end."""

    def __init__(self, emit: Callable[[str], None], what: str, unit: str = "MB", scale: float = 1e6, every: float = 5.0) -> None:
        self.emit, self.what, self.unit, self.scale, self.every = emit, what, unit, scale, every
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: float, total: float, extra: str = "", final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        eta = f", ETA {max(total - done, 0) / rate:,.0f} s" if rate > 0 and total and not final else ""
        self.emit(
            f"{self.what}: {done / self.scale:,.1f}/{total / self.scale:,.1f} {self.unit}{pct}, "
            f"{rate / self.scale:,.2f} {self.unit}/s{eta}{', ' + extra if extra else ''}"
        )
