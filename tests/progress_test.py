"""egoexo_jax/progress.py: plain log lines off a terminal, a redrawn line on one."""

import io

from egoexo_jax import progress


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_describe():
  assert progress.describe(100, 400, 50.0, "videos", "object score") == (
      "object score: 100/400 videos (25%), 2 videos/s, 0m50s elapsed, ETA 2m30s")
  assert progress.describe(7, None, 2.0, "texts") == "7 texts, 3.5 texts/s, 0m02s elapsed"


def test_log_lines_every_interval_when_not_a_terminal():
  clock, lines, stream = Clock(), [], io.StringIO()
  with progress.Progress(10, what="videos", every_s=30, stream=stream, log=lines.append, clock=clock) as bar:
    for _ in range(10):
      clock.now += 10.0  # one video per 10 s: a line at 30 s, 60 s, 90 s, then the final one
      bar.update()
  assert lines == ["3/10 videos (30%), 0.1 videos/s, 0m30s elapsed, ETA 1m10s",
                   "6/10 videos (60%), 0.1 videos/s, 1m00s elapsed, ETA 0m40s",
                   "9/10 videos (90%), 0.1 videos/s, 1m30s elapsed, ETA 0m10s",
                   "10/10 videos (100%), 0.1 videos/s, 1m40s elapsed"]
  assert stream.getvalue() == ""  # nothing with carriage returns in a log file


def test_terminal_line_is_redrawn_in_place():
  clock, lines, stream = Clock(), [], io.StringIO()
  items = list(progress.track(range(3), what="clips", stream=stream, log=lines.append, clock=clock, terminal=True))
  assert items == [0, 1, 2] and lines == []
  assert stream.getvalue().count("\r") == 1 and stream.getvalue().endswith("3/3 clips (100%), 0 clips/s, 0m00s elapsed\n")


def test_track_reports_how_far_it_got_on_an_error():
  lines = []
  try:
    for i in progress.track(range(5), log=lines.append, terminal=False, clock=Clock()):
      if i == 2:
        raise KeyError("bad record")
  except KeyError:
    pass
  assert lines == ["2/5 items (40%), 0 items/s, 0m00s elapsed"]
