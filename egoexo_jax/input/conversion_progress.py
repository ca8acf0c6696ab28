"""A one-line progress display for the converter: counts, rates and time left.

On a terminal the line is redrawn in place (at most every `tty_interval` seconds); when the stream is
not a terminal (a log file, CI), a complete line is written at most every `log_interval` seconds and at
the end, so log files get a few readable lines instead of carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
  """Videos done of `total`, frames stored, videos/s and frames/s since the start, time left."""

  def __init__(self, total: int, label: str = "converting", stream: TextIO | None = None,
               tty_interval: float = 0.2, log_interval: float = 30.0, clock=time.monotonic):
    self.total, self.label, self.stream, self.clock = total, label, stream or sys.stderr, clock
    isatty = getattr(self.stream, "isatty", None)
    self.tty = bool(isatty and isatty())
    self.interval = tty_interval if self.tty else log_interval
    self.done = self.frames = self.skipped = self.reused = 0
    self.start = self._last = clock()

  def line(self) -> str:
    elapsed = max(self.clock() - self.start, 1e-9)
    worked = self.done - self.reused  # videos converted by this run (reused shards cost no time)
    rate = worked / elapsed
    left = f", {_duration((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
    reused = f", {self.reused} reused" if self.reused else ""
    return (f"{self.label}: {self.done}/{self.total} videos ({100 * self.done / max(self.total, 1):.0f}%), "
            f"{self.frames} frames, {rate:.2f} videos/s, {self.frames / elapsed:.1f} frames/s, "
            f"{self.skipped} skipped{reused}, {_duration(elapsed)} elapsed{left}")

  def update(self, videos: int = 1, frames: int = 0, skipped: int = 0, reused: int = 0) -> None:
    self.done += videos
    self.frames += frames
    self.skipped += skipped
    self.reused += reused
    now = self.clock()
    if now - self._last >= self.interval:
      self._last = now
      self._write(self.line())

  def close(self) -> None:
    self._write(self.line())
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()

  def _write(self, text: str) -> None:
    if self.tty:
      self.stream.write("\r\x1b[K" + text)
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
