"""A tiny progress bar for long loops (feature extraction), without third-party dependencies.

On a terminal it redraws one line in place (``desc: 1234/5678 (21%) 85.2 it/s``) at most ~5 times a
second; on a pipe or log file it prints a full line only every 10% so logs stay short.
"""
from __future__ import annotations

import sys
import time


class Progress:
    """Counts ``update(n)`` calls towards ``total`` items and reports the rate on ``stream``.

    ``enabled=False`` makes every method a no-op, so callers need no ``if`` around it.
    Usable as a context manager; ``close()`` writes the final line and a newline once.
    """

    _MIN_INTERVAL = 0.2  # seconds between terminal redraws: ~5 per second
    _LOG_STEP = 10  # percent between lines when the stream is not a terminal

    def __init__(self, total: int, desc: str = "", stream=None, enabled: bool = True, start: int = 0):
        if not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be a non-negative int, got {total!r}")
        self.total = total
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.count = start
        # The rate counts only items done in this run (a resumed extraction starts at ``start``).
        self._start_count = start
        self._t0 = time.perf_counter()
        self._last_draw = float("-inf")
        self._last_logged_step = self._step(start)
        self._closed = False
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty and isatty())

    def _step(self, count: int) -> int:
        return (100 * count // self.total) // self._LOG_STEP if self.total else 0

    def _line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        rate = (self.count - self._start_count) / elapsed if elapsed > 0 else 0.0
        pct = 100 * self.count // self.total if self.total else 100
        prefix = f"{self.desc}: " if self.desc else ""
        return f"{prefix}{self.count}/{self.total} ({pct}%) {rate:.1f} it/s"

    def update(self, n: int = 1) -> None:
        """Add ``n`` finished items; redraw if enough time (terminal) or progress (log) has passed."""
        if not self.enabled or self._closed:
            return
        self.count += n
        if self._tty:
            now = time.perf_counter()
            if now - self._last_draw >= self._MIN_INTERVAL:
                self._last_draw = now
                self.stream.write("\r" + self._line())
                self.stream.flush()
        else:
            step = self._step(self.count)
            # The 100% line is left to close() so it is printed exactly once.
            if step > self._last_logged_step and self.count < self.total:
                self._last_logged_step = step
                self.stream.write(self._line() + "\n")
                self.stream.flush()

    def close(self) -> None:
        """Print the final state and end the line; later calls do nothing."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self.stream.write(("\r" if self._tty else "") + self._line() + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
