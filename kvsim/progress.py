"""The one progress display of every long command, on stderr: ``kvsim sweep`` and ``kvsim search``
count finished items (points, configurations), ``kvsim run`` reports simulated time.

On a terminal the line is redrawn in place (at most every ``REDRAW_S``); off a terminal (piped,
logged) a counted display writes one line when the work starts and one per finished item, and a
status display one line every ``LOG_S``, so a log shows the work advancing without flooding.
``enabled=False`` (``--quiet``) silences it.
"""

from __future__ import annotations

import math
import sys
import time

REDRAW_S = 0.25  # a terminal line is redrawn at most this often
LOG_S = 10.0  # off a terminal, a status line at most this often
BAR_WIDTH = 30


class Progress:
    """Progress of one command: ``update`` for counted items out of ``total``, ``status`` for
    free-form text (simulated time); ``close`` ends the line."""

    def __init__(self, label: str, enabled: bool, total: int | None = None) -> None:
        self.label, self.enabled, self.total = label, enabled, total
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last_s = -math.inf  # when the last status line was written
        self.shown = -1  # items finished at the last line written (off a terminal)
        self.drawn = False  # a terminal line is open
        if enabled and not self.tty and total is not None:
            self._write(f"{label}: {total} to run\n")

    def _write(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def update(self, done: int, errors: int = 0) -> None:
        """``done`` of ``total`` items finished, ``errors`` of them failed."""
        assert self.total is not None, "update counts items: give total"
        if not self.enabled or (not self.tty and done in (self.shown, 0)):  # a log gets news only
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - done) if done else math.nan
        tail = (f"{f'  {errors} failed' if errors else ''}  {elapsed:.0f} s"
                f"{f'  ETA {eta:.0f} s' if done < self.total and done else ''}")
        if self.tty:
            bar = "#" * int(BAR_WIDTH * done / max(self.total, 1))
            self._write(f"\r{self.label} [{bar:<{BAR_WIDTH}}] {done}/{self.total}{tail}   ")
            self.drawn = True
        else:
            self.shown = done
            self._write(f"{self.label}: {done}/{self.total} done{tail}\n")

    def status(self, text: str) -> None:
        """A free-form status (``12.5 s simulated, 300 requests``), with the wall time so far."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        if elapsed - self.last_s < (REDRAW_S if self.tty else LOG_S):
            return
        self.last_s = elapsed
        line = f"{self.label}: {text}, {elapsed:.1f} s wall"
        if self.tty:
            self._write(f"\r{line}   ")
            self.drawn = True
        else:
            self._write(line + "\n")

    def close(self) -> None:
        if self.drawn:
            self._write("\n")
