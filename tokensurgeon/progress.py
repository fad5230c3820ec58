"""Progress a person can follow: one line or bar per phase, and a time summary at the end.

Boundary: output only (to stderr); it knows nothing about models. A command wraps each
phase in ``progress.get().phase(name)`` (or marks phase boundaries with ``start(name)``);
deep code (the builtin-model conversion, a method's inner loop, a trainer's steps, the
libraries' own progress bars) reports through the same object without having it passed down.

- A phase begun inside another is its child; the innermost running phase speaks, naming
  where it sits: ``load > converting builtin:gemma3-270m > weights: converting and
  de-quantizing gguf tensors [#####...............] 69/272, ~13 s left (75 s)``.
- A phase that ends within ``delay`` seconds (default 1) prints nothing, so a command that
  fails on bad input prints only its one error line. ``delay=0`` announces every phase as
  it begins.
- A longer phase prints a line as soon as it has run ``delay`` seconds and then refreshes it
  from a background thread: on a terminal a ``\\r``-rewritten bar every half second, on a
  pipe or file a plain line every ``interval`` seconds (default 5), so a slow step is never
  silent even when its own counter moves rarely.
- Countable work shows done/total and the time left, e.g.
  ``train [####................] 20/100 step, ~2 min 04 s left, loss=2.3130 (31 s)``.
- A named reporter (the CLI names it after the command) also speaks before its first phase
  and between phases, after the same delay: ``spec train: preparing (1.1 s)``,
  ``spec train (31 s)``, so no stretch of a command is silent; its summary counts the time
  before the first phase as "preparing". (Input checks run before the first phase: one that
  fails within ``delay`` leaves its error line alone on stderr.)
- ``summary()`` is the wall time per phase, children in brackets inside their parent, e.g.
  ``load 84.0 s [converting builtin:gemma3-270m 60.2 s], match 3.0 s, save 20.3 s
  (total 117.7 s)``: the parts shown at one level add up to at most their parent (the
  total, at the top level). The CLI prints it after every command.
- ``--quiet`` (``Progress(quiet=True)``) prints nothing; times are still recorded.

Progress callback API (for loops such as OMP batches)::

    with progress.get().phase("omp embed", total=n_tokens, unit="tok") as bar:
        for batch in ...:
            ...
            bar.update(len(batch))      # or bar.set(done)

A loop deep inside a phase that its caller began (e.g. the OMP batches inside
``transplant``'s "omp embed") sets that phase's counter with
``progress.get().report(done, total, unit)`` instead of drawing a bar of its own.
``progress.get().counter(total, ...)`` is the same as a tqdm-like object (``update``,
``set_postfix``, ``close``, iteration): trainers count steps with it, and
:func:`capture_library_bars` routes transformers' own bars into it, so no second bar
interleaves with ours.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Self, TextIO

PREPARING = "preparing"  # what a command does before its first phase: checks, imports, set-up


def duration(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``2 min 19 s``, ``1 h 05 min``: as precise as a person reads it."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min {int(seconds % 60):02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Phase:
    """One named phase: its counter (optional total), start time and place in the tree."""

    def __init__(self, name: str, total: int | None, unit: str, parent: Phase | None = None,
                 owner: int | None = None):
        self.name, self.total, self.unit = name, total, unit
        # owner: the id of the frame whose start() began it (None: a ``with`` phase)
        self.parent, self.owner = parent, owner
        self.done = 0
        self.start = time.perf_counter()
        self.end: float | None = None
        # The counter's origin: the time left is extrapolated from the work done since then
        # (a resumed run starts at its checkpoint's step, a counter may start mid-phase).
        self.base, self.counted_since = 0, self.start
        self.what = ""  # what a counter attached mid-phase counts ("loading weights")
        self.note = ""  # figures a loop attaches, e.g. "loss=2.3130"

    def update(self, n: int = 1) -> None:
        self.done += n

    def set(self, done: int) -> None:
        self.done = done

    def count(self, items: Iterable) -> Iterator:
        """Yield ``items``, counting each one done after the loop body has run."""
        for item in items:
            yield item
            self.done += 1

    def __call__(self, done: int, total: int | None = None) -> None:
        """Callback form: ``report(done, total)``; a new total starts a new count."""
        if total is not None and total != self.total:
            self.count_from(done, total)
        self.done = done

    def count_from(self, done: int, total: int | None, unit: str | None = None,
                   what: str = "") -> None:
        """Start counting ``done`` of ``total`` from now (the time left is measured from here)."""
        self.total, self.done, self.base, self.what = total, done, done, what
        self.counted_since = time.perf_counter()
        if unit is not None:
            self.unit = unit

    @property
    def seconds(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def seconds_left(self) -> float | None:
        """Time left at the rate since the count began; None until something is done."""
        if not self.total or self.done <= self.base or self.done >= self.total:
            return None
        spent = time.perf_counter() - self.counted_since
        return spent * (self.total - self.done) / (self.done - self.base)

    def path(self) -> str:
        """``"load > converting builtin:x > weights"``: where the phase sits."""
        return self.name if self.parent is None else f"{self.parent.path()} > {self.name}"

    def line(self) -> str:
        text = f"{self.path()}: {self.what}" if self.what else self.path()
        if self.total:
            share = min(self.done / self.total, 1.0)
            width = 20
            bar = "#" * int(share * width) + "." * (width - int(share * width))
            text += f" [{bar}] {self.done:,}/{self.total:,} {self.unit}".rstrip()
            left = self.seconds_left()
            if left is not None:
                text += f", ~{duration(left)} left"
        elif self.done:
            text += f" {self.done:,} {self.unit}".rstrip()
        if self.note:
            text += f", {self.note}"
        return f"{text} ({duration(self.seconds)})"


class Counter:
    """A tqdm-like handle on a phase's counter: ``update``, ``set_postfix``, ``close``,
    iteration, ``with``. Anything else tqdm offers is accepted and ignored.

    It counts on the innermost running phase; outside any phase it runs a phase of its own,
    named ``name``, that ``close`` ends.
    """

    def __init__(self, progress: Progress, total: int | None = None, initial: int = 0,
                 unit: str = "", what: str = "", name: str = "", iterable: Iterable | None = None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self._progress, self._iterable = progress, iterable
        self._own = None
        with progress._lock:
            phase = progress._active[-1] if progress._active else None
        if phase is None and progress.quiet:  # nothing to show: count on a phase of no one's
            phase = Phase(name or what, None, unit)
        elif phase is None:
            self._own = progress._begin(name or what or "working", None, unit)
            phase = self._own
        self.phase = phase
        self._saved = (phase.total, phase.done, phase.base, phase.counted_since, phase.unit,
                       phase.what, phase.note)
        phase.count_from(initial, total, unit, "" if self._own else what)
        self.n, self.total = initial, total

    def update(self, n: int = 1) -> None:
        self.n += n
        self.phase.done = self.n

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        figures = {**(ordered_dict or {}), **kwargs}
        self.phase.note = ", ".join(f"{k}={v}" for k, v in figures.items())

    def __iter__(self) -> Iterator:
        for item in self._iterable or ():
            yield item
            self.update(1)
        self.close()

    def close(self) -> None:
        """End the counter: its own phase ends; a phase that lent itself to a library's count
        gets its own count back (a trainer's step count stays to the phase's end)."""
        if self._own is not None:
            if self._own.end is None:
                self._progress._end(self._own, True)
        elif self.phase.what:  # a library's count inside our phase: the phase goes on
            (self.phase.total, self.phase.done, self.phase.base, self.phase.counted_since,
             self.phase.unit, self.phase.what, self.phase.note) = self._saved

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # refresh, set_description, clear, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class Progress:
    """Phase lines on ``stream`` (stderr); see the module docstring."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, delay: float = 1.0,
                 interval: float = 5.0, tty: bool | None = None, name: str = ""):
        self.quiet, self.name = quiet, name
        self.stream = stream if stream is not None else sys.stderr
        self.delay, self.interval = delay, interval
        self.tty = self.stream.isatty() if tty is None else tty
        self.began = self._idle_since = time.perf_counter()
        self.closed_at: float | None = None
        self.phases: list[Phase] = []
        self._active: list[Phase] = []  # the running phases, outermost first
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._printed: dict[Any, float] = {}  # phase id (or idle stretch) -> last printed
        if name:  # the command speaks even before its first phase
            self._ensure_thread()

    # -- phases ------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "") -> Iterator[Phase]:
        """Time a phase, a child of the running one; its line appears after ``delay`` s."""
        ph = self._begin(name, total, unit)
        ok = False
        try:
            yield ph
            ok = True
        finally:
            self._end(ph, ok)

    def start(self, name: str, total: int | None = None, unit: str = "") -> Phase:
        """Begin a phase that lasts until the calling function's next :meth:`start` or
        :meth:`finish` (one line at each phase boundary of a long function, without
        re-indenting it). It is a child of the phase running when it begins, so a function
        called inside a phase (e.g. a backend inside ``spec bench``'s "measure") can mark
        phases of its own; a phase that a function which has returned left running ends here."""
        with self._lock:
            self._end_own(sys._getframe(1))
            return self._begin(name, total, unit, owner=id(sys._getframe(1)))

    def finish(self) -> None:
        """End the phase begun by the calling function's :meth:`start`, if any."""
        with self._lock:
            self._end_own(sys._getframe(1))

    def _end_own(self, frame: Any) -> None:
        """End the outermost running phase that ``frame``'s start() began, or that a function
        no longer running began, with the phases inside it. Phases outside the innermost
        running ``with`` phase are left alone: a start() inside that block is its child."""
        mine, live = id(frame), set()
        while frame is not None:
            live.add(id(frame))
            frame = frame.f_back
        outermost = None
        for ph in reversed(self._active):
            if ph.owner is None:
                break
            if ph.owner == mine or ph.owner not in live:
                outermost = ph
        if outermost is not None:
            self._end(outermost, True)

    def counter(self, total: int | None = None, initial: int = 0, unit: str = "",
                what: str = "", name: str = "", iterable: Iterable | None = None) -> Counter:
        """A tqdm-like :class:`Counter` on the running phase (or on a phase ``name`` of its own)."""
        return Counter(self, total, initial, unit, what, name, iterable)

    def _begin(self, name: str, total: int | None, unit: str, owner: int | None = None) -> Phase:
        with self._lock:
            ph = Phase(name, total, unit, self._active[-1] if self._active else None, owner)
            self.phases.append(ph)
            self._active.append(ph)
            announce = self.delay <= 0 and not self.quiet
            if announce:
                self._printed[id(ph)] = ph.start
        self._ensure_thread()
        if announce:
            self._write(ph.line(), final=False)
        return ph

    def _end(self, ph: Phase, ok: bool) -> None:
        """End ``ph`` and any of its children still running (innermost first)."""
        with self._lock:
            if ph not in self._active:
                return
            ending = self._active[self._active.index(ph):]
            del self._active[self._active.index(ph):]
            now = time.perf_counter()
            if not self._active:
                self._idle_since = now
        for child in reversed(ending):
            child.end = now
            if ok and child.total:  # a phase that ended well did all its work
                child.done = max(child.done, child.total)
            if id(child) in self._printed and not self.quiet:
                self._write(f"{child.line()} done" if ok else f"{child.line()} stopped", final=True)

    def report(self, done: int, total: int | None = None, unit: str | None = None) -> None:
        """Set the counter of the innermost running phase; a no-op outside any phase."""
        with self._lock:
            ph = self._active[-1] if self._active else None
        if ph is not None:
            ph(done, total)
            if unit is not None:
                ph.unit = unit

    def _idle_line(self) -> str:
        doing = "" if self.phases else f": {PREPARING}"
        return f"{self.name}{doing} ({duration(time.perf_counter() - self.began)})"

    def total_seconds(self) -> float:
        """From this reporter's creation (the command's start) to :meth:`close` (or now)."""
        return (self.closed_at or time.perf_counter()) - self.began

    def tree(self) -> list[tuple[str, float, list]]:
        """``[(name, seconds, children), ...]``: phases with one name under one parent are
        added up, in the order they first began; children have the same form."""
        def level(phases: list[Phase]) -> list[tuple[str, float, list]]:
            merged: dict[str, list[Phase]] = {}
            for ph in phases:
                merged.setdefault(ph.name, []).append(ph)
            out = []
            for name, group in merged.items():
                ids = {id(ph) for ph in group}
                children = [ph for ph in self.phases if ph.parent is not None and id(ph.parent) in ids]
                out.append((name, sum(ph.seconds for ph in group), level(children)))
            return out

        top = level([ph for ph in self.phases if ph.parent is None])
        if self.name and self.phases:  # a command's checks and set-up before its first phase
            before = self.phases[0].start - self.began
            if before >= 0.05:
                top.insert(0, (PREPARING, before, []))
        return top

    def summary(self) -> str:
        """``time per phase: load 4.0 s [converting 3.1 s], train 9.5 s (total 14.2 s)``."""
        def render(nodes: list[tuple[str, float, list]]) -> str:
            return ", ".join(f"{name} {secs:.1f} s" + (f" [{render(kids)}]" if kids else "")
                             for name, secs, kids in nodes)

        parts = render(self.tree())
        total = f"total {self.total_seconds():.1f} s"
        return f"time per phase: {parts} ({total})" if parts else f"time per phase: ({total})"

    def seconds(self) -> dict[str, float]:
        """{phase path: wall seconds}, rounded, for manifests; a child's path is
        ``"parent > child"``."""
        out: dict[str, float] = {}

        def walk(nodes: list[tuple[str, float, list]], prefix: str) -> None:
            for name, secs, kids in nodes:
                out[prefix + name] = round(secs, 2)
                walk(kids, f"{prefix}{name} > ")

        walk(self.tree(), "")
        return out

    def message(self, text: str) -> None:
        """A one-off line (not for errors: those go through UsageError)."""
        if not self.quiet:
            self._write(text, final=True)

    def close(self, ok: bool = True) -> None:
        """End every running phase (``ok``: done, else stopped) and stop the refresh thread."""
        with self._lock:
            outer = self._active[0] if self._active else None
        if outer is not None:
            self._end(outer, ok)
        if self.closed_at is None:
            self.closed_at = time.perf_counter()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    # -- output ------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self.quiet or self.closed_at is not None or (
                self._thread is not None and self._thread.is_alive()):
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
                if self._active:
                    ph = self._active[-1]  # the innermost phase speaks
                    key, since, line = id(ph), ph.start, ph.line
                elif self.name:  # before or between phases: the command itself
                    key, since = ("idle", self._idle_since), self._idle_since
                    line = self._idle_line
                else:
                    continue
                if now - since < self.delay:
                    continue
                last = self._printed.get(key)
                if last is not None and now - last < every:
                    continue
                self._printed[key] = now
                text = line()
            self._write(text, final=False)

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
    ok = False
    try:
        yield progress
        ok = True
    finally:
        progress.close(ok)  # a phase still running when the command failed is "stopped"
        _current = previous


def _library_bar(factory: Any, args: tuple, kwargs: dict) -> Counter:
    """transformers' tqdm hook: its bar becomes a count on our running phase."""
    iterable = args[0] if args else kwargs.get("iterable")
    what = str(kwargs.get("desc") or "").rstrip(". ").lower()
    return get().counter(kwargs.get("total"), unit=str(kwargs.get("unit") or ""), what=what,
                         name=what, iterable=iterable)


class _LibraryTqdm(Counter):
    """Stands in for ``tqdm`` in a library module that imports it directly."""

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None,
                 total: int | None = None, unit: str = "", **_: Any):
        what = str(desc or "").rstrip(". ").lower()
        super().__init__(get(), total, 0, unit, what, what, iterable)


_captured = False


def capture_library_bars() -> None:
    """Route transformers' progress bars (loading weights, writing shards) into the running
    phase's counter, in a terminal and a log alike: our phase line shows their count and
    nothing interleaves with it. Hub download bars are turned off."""
    global _captured
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # the hook below sees every bar; it draws none itself
    hf_logging.set_tqdm_hook(_library_bar)
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    _captured = True


def capture_module_bars(module: Any) -> None:
    """After :func:`capture_library_bars`, also route a library module that imports ``tqdm``
    itself (transformers' GGUF loader) into our counters; otherwise leave it alone."""
    if _captured and getattr(module, "tqdm", None) is not None:
        module.tqdm = _LibraryTqdm
