"""Progress of long loops (teachers, feature extraction, conversion, evaluation) that does not break logs.

  for record in progress.track(records, total=len(records), what="videos"):
    ...

On a terminal (stderr is a TTY) one line is redrawn in place with a carriage return: count/total,
percent, rate, elapsed and ETA. Otherwise (a log file, a pipe, CI) a plain absl INFO line is logged
every `every_s` seconds and once at the end, so a log file holds a few readable lines and no control
characters. `Progress` is the same thing for loops that advance by more than one item (`update(n)`).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from absl import logging

T = TypeVar("T")

EVERY_S = 30.0  # seconds between plain lines when the output is not a terminal
REDRAW_S = 0.2  # seconds between redraws of the terminal line


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def describe(done: int, total: int | None, elapsed: float, what: str, desc: str = "") -> str:
  """'desc: 120/400 videos (30%), 4.1 videos/s, 29s elapsed, ETA 1m08s' (no total: no percent or ETA)."""
  rate = done / elapsed if elapsed > 0 else 0.0
  head = f"{desc}: " if desc else ""
  if total:
    text = f"{head}{done}/{total} {what} ({100 * done / total:.0f}%), {rate:.3g} {what}/s, {_duration(elapsed)} elapsed"
    if 0 < done < total and rate > 0:
      text += f", ETA {_duration((total - done) / rate)}"
    return text
  return f"{head}{done} {what}, {rate:.3g} {what}/s, {_duration(elapsed)} elapsed"


def is_terminal(stream: TextIO | None = None) -> bool:
  """Whether `stream` (default sys.stderr) is a terminal, where a redrawn line belongs."""
  isatty = getattr(stream if stream is not None else sys.stderr, "isatty", None)
  return bool(isatty and isatty())


class Progress:
  """Counts items; shows them on a terminal line or as periodic log lines (see the module docstring).

  `stream` (default sys.stderr) decides: a TTY gets the redrawn line; anything else gets `log` lines
  (default absl logging.info) every `every_s` seconds. `clock` is injectable for tests.
  """

  def __init__(self, total: int | None = None, *, what: str = "items", desc: str = "", every_s: float = EVERY_S,
               stream: TextIO | None = None, log: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.perf_counter, terminal: bool | None = None):
    self.total, self.what, self.desc, self.every_s = total, what, desc, every_s
    self.stream = stream if stream is not None else sys.stderr
    self.log = log or (lambda text: logging.info("%s", text))
    self.clock = clock
    self.terminal = terminal if terminal is not None else is_terminal(self.stream)
    self.done = 0
    self.start = self.clock()
    self._last_shown = self.start
    self._closed = False

  def update(self, n: int = 1) -> None:
    self.done += n
    now = self.clock()
    interval = REDRAW_S if self.terminal else self.every_s
    if now - self._last_shown >= interval:
      self._show(now)

  def _show(self, now: float, final: bool = False) -> None:
    self._last_shown = now
    text = describe(self.done, self.total, now - self.start, self.what, self.desc)
    if self.terminal:
      self.stream.write("\r" + text + ("\n" if final else "\x1b[K"))
      self.stream.flush()
    else:
      self.log(text)

  def close(self) -> None:
    """Shows the final count once (also after an error: how far it got)."""
    if not self._closed:
      self._closed = True
      self._show(self.clock(), final=True)

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def track(items: Iterable[T], total: int | None = None, **kwargs) -> Iterator[T]:
  """Yields `items`, counting each one in a Progress (total defaults to len(items) when it has one)."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with Progress(total, **kwargs) as bar:
    for item in items:
      yield item
      bar.update()
