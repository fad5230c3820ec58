"""Progress a person can follow: one line or bar per phase, and a time summary at the end.

Boundary: output only (to stderr); it knows nothing about models. A command wraps each
phase in ``progress.get().phase(name)``; deep code (the builtin-model conversion, a method's
inner loop) reports through the same object without having it passed down.

- A phase that ends within ``delay`` seconds (default 2) prints nothing, so a command that
  fails on bad input prints only its one error line.
- A longer phase prints a line as soon as it has run ``delay`` seconds and then refreshes it
  from a background thread: on a terminal a ``\\r``-rewritten bar every half second, on a
  pipe or file a plain line every ``interval`` seconds (default 5), so a slow step is never
  silent even when its own counter moves rarely.
- ``summary()`` is the per-phase wall time, e.g. ``load 12.1 s, match 3.0 s, omp embed 61.4 s,
  save 20.3 s (total 96.8 s)``; the CLI prints it after a command that ran phases.
- ``--quiet`` (``Progress(quiet=True)``) prints nothing; times are still recorded.

Progress callback API (for loops such as OMP batches)::

    with progress.get().phase("omp embed", total=n_tokens, unit="tok") as bar:
        for batch in ...:
            ...
            bar.update(len(batch))      # or bar.set(done)

A loop deep inside a phase that its caller began (e.g. the OMP batches inside
``transplant``'s "omp embed") sets that phase's counter with
``progress.get().report(done, total, unit)`` instead of drawing a bar of its own.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO


class Phase:
    """One named phase: its counter (optional total) and start time."""

    def __init__(self, name: str, total: int | None, unit: str):
        self.name, self.total, self.unit = name, total, unit
        self.done = 0
        self.start = time.perf_counter()
        self.end: float | None = None

    def update(self, n: int = 1) -> None:
        self.done += n

    def set(self, done: int) -> None:
        self.done = done

    def __call__(self, done: int, total: int | None = None) -> None:
        """Callback form: ``report(done, total)``."""
        self.done = done
        if total is not None:
            self.total = total

    @property
    def seconds(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def line(self) -> str:
        text = f"{self.name}"
        if self.total:
            share = min(self.done / self.total, 1.0)
            width = 20
            bar = "#" * int(share * width) + "." * (width - int(share * width))
            text += f" [{bar}] {self.done:,}/{self.total:,} {self.unit}".rstrip()
            if 0 < self.done < self.total:
                left = self.seconds * (self.total - self.done) / self.done
                text += f", ~{left:.0f} s left"
        elif self.done:
            text += f" {self.done:,} {self.unit}".rstrip()
        secs = self.seconds
        return f"{text} ({secs:.1f} s)" if secs < 10 else f"{text} ({secs:.0f} s)"


class Progress:
    """Phase lines on ``stream`` (stderr); see the module docstring."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, delay: float = 2.0,
                 interval: float = 5.0, tty: bool | None = None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.delay, self.interval = delay, interval
        self.tty = self.stream.isatty() if tty is None else tty
        self.phases: list[Phase] = []
        self._active: list[Phase] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._printed: dict[int, float] = {}  # id(phase) -> when its line was last printed
        self._sequential: Phase | None = None

    # -- phases ------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "") -> Iterator[Phase]:
        """Time a phase; its line appears once it has run ``delay`` seconds."""
        ph = self._begin(name, total, unit)
        ok = False
        try:
            yield ph
            ok = True
        finally:
            self._end(ph, ok)

    def start(self, name: str, total: int | None = None, unit: str = "") -> Phase:
        """Begin a phase that lasts until the next :meth:`start` or :meth:`finish` (one line
        at each phase boundary of a long function, without re-indenting it)."""
        self.finish()
        self._sequential = self._begin(name, total, unit)
        return self._sequential

    def finish(self) -> None:
        """End the phase begun by :meth:`start`, if any."""
        if getattr(self, "_sequential", None) is not None:
            ph, self._sequential = self._sequential, None
            self._end(ph, True)

    def _begin(self, name: str, total: int | None, unit: str) -> Phase:
        ph = Phase(name, total, unit)
        with self._lock:
            self.phases.append(ph)
            self._active.append(ph)
        self._ensure_thread()
        return ph

    def _end(self, ph: Phase, ok: bool) -> None:
        ph.end = time.perf_counter()
        with self._lock:
            if ph in self._active:
                self._active.remove(ph)
            printed = id(ph) in self._printed
        if printed and not self.quiet:
            if ok and ph.total:
                ph.done = max(ph.done, ph.total)
            self._write(f"{ph.line()} done" if ok else f"{ph.line()} stopped", final=True)

    def report(self, done: int, total: int | None = None, unit: str | None = None) -> None:
        """Set the counter of the innermost running phase; a no-op outside any phase."""
        with self._lock:
            ph = self._active[-1] if self._active else None
        if ph is not None:
            ph(done, total)
            if unit is not None:
                ph.unit = unit

    def summary(self) -> str:
        """Wall seconds per phase (phases with one name are added up) and the total."""
        totals: dict[str, float] = {}
        for ph in self.phases:
            totals[ph.name] = totals.get(ph.name, 0.0) + ph.seconds
        if not totals:
            return ""
        parts = ", ".join(f"{name} {secs:.1f} s" for name, secs in totals.items())
        first = min(ph.start for ph in self.phases)
        last = max(ph.end or time.perf_counter() for ph in self.phases)
        return f"time per phase: {parts} (total {last - first:.1f} s)"

    def seconds(self) -> dict[str, float]:
        """{phase name: wall seconds}, rounded, for manifests."""
        out: dict[str, float] = {}
        for ph in self.phases:
            out[ph.name] = round(out.get(ph.name, 0.0) + ph.seconds, 2)
        return out

    def message(self, text: str) -> None:
        """A one-off line (not for errors: those go through UsageError)."""
        if not self.quiet:
            self._write(text, final=True)

    def close(self) -> None:
        self.finish()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    # -- output ------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self.quiet or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._tick, name="tokensurgeon-progress",
                                        daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        every = 0.5 if self.tty else self.interval
        while not self._stop.wait(0.25):
            now = time.perf_counter()
            with self._lock:
                if not self._active:
                    continue
                ph = self._active[-1]  # the innermost phase speaks
                if now - ph.start < self.delay:
                    continue
                last = self._printed.get(id(ph))
                if last is not None and now - last < every:
                    continue
                self._printed[id(ph)] = now
            self._write(ph.line(), final=False)

    def _write(self, text: str, final: bool) -> None:
        try:
            if self.tty:
                self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not break the command
            pass


_current = Progress(quiet=True)


def get() -> Progress:
    """The progress reporter of the running command (a silent one outside the CLI)."""
    return _current


@contextlib.contextmanager
def use(progress: Progress) -> Iterator[Progress]:
    """Make ``progress`` the reporter for the duration of a command."""
    global _current
    previous, _current = _current, progress
    try:
        yield progress
    except BaseException:
        if progress._sequential is not None:  # the phase that was running failed
            ph, progress._sequential = progress._sequential, None
            progress._end(ph, False)
        raise
    finally:
        progress.close()
        _current = previous
