"""Progress that suits where it goes: a bar on a terminal, plain lines in a log, nothing when quiet.

A bar redraws itself with carriage returns and cursor escapes, which fill a job's log file (and a
notebook: its stderr is no terminal) with noise; there a line is written every ``every`` seconds
and at the end, each the whole state, with no escape in it. ``set_quiet(True)`` (``--quiet``)
silences every progress report of the process. Work is counted in whatever units the caller
weighs its steps by (the report: an analysis's ``Analysis.cost``, in captures), so the share done
is the share of the time, not of the steps.

tqdm is imported only when a bar is drawn: ``tqdm.auto`` in a notebook without ipywidgets warns
at import.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_QUIET = False

EVERY_S = 10.0  # seconds between two lines in a log


def set_quiet(quiet: bool) -> None:
    """Silence (``True``) or allow every progress report of this process (``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def progress_line(desc: str, done: int | float, total: int | float, elapsed: int | float, unit: str, note: str = "") -> str:
    """One log line: ``desc: pct% (done/total unit) elapsed s`` and what is running, with no escape in it.

    The share is ``done / total`` (``total`` 0: 100%).

    >>> progress_line("report", 3.0, 12.0, 4.2, "captures", "model gains")
    'report: 25% (3/12 captures) 4 s: model gains'
    """
    share = 100.0 if total <= 0 else 100.0 * min(done, total) / total
    tail = f": {note}" if note else ""
    return f"{desc}: {share:.0f}% ({done:.3g}/{total:.3g} {unit}) {elapsed:.0f} s{tail}"


class Progress:
    """Work done out of ``total``: a tqdm bar when ``stream`` is a terminal, else a line every ``every`` s
    and one at the end; nothing when ``enabled`` is false or the process is quiet (``set_quiet``).
    ``stream``: where it goes (a text stream; default ``sys.stderr``).

    >>> import io
    >>> log = io.StringIO()
    >>> with Progress(2, "corpus", unit="prompt", stream=log) as bar:
    ...     bar.update(1); bar.update(1, "done")
    >>> log.getvalue().splitlines()[-1]
    'corpus: 100% (2/2 prompt) 0 s: done'
    """

    def __init__(self, total: int | float, desc: str, *, unit: str = "step", initial: int | float = 0, enabled: bool = True,
                 stream=None, every: int | float = EVERY_S, leave: bool = True):
        self.total, self.desc, self.unit, self.done, self.every = float(total), desc, unit, float(initial), every
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and not _QUIET
        self.note = ""
        self.started = self.last = time.monotonic()
        self.bar = None
        if self.enabled and _is_terminal(self.stream):
            from tqdm.std import tqdm  # the plain bar; only here, where one is drawn

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=leave)

    def update(self, amount: int | float = 1, note: str = "") -> None:
        """``amount`` more work done; ``note``: what is running now."""
        self.done += amount
        self.note = note or self.note
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(amount)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()
        self.enabled = False  # closed twice (a with-block and an explicit close): one last line

    def _line(self) -> None:
        self.last = time.monotonic()
        print(progress_line(self.desc, self.done, self.total, self.last - self.started, self.unit, self.note),
              file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "item", enabled: bool = True,
          leave: bool = True) -> Iterator[T]:
    """``items``, reporting one unit of progress after each (``Progress``).

    >>> list(track(range(3), "batches", enabled=False))
    [0, 1, 2]
    """
    items = list(items) if total is None else items
    with Progress(len(items) if total is None else total, desc, unit=unit, enabled=enabled, leave=leave) as bar:
        for item in items:
            yield item
            bar.update(1)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
