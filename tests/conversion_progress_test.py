"""The converter's progress line: counts and rates, redrawn on a terminal, whole lines in a log file."""

import io

from egoexo_jax.input import conversion_progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_log_file_gets_whole_lines_at_the_interval_and_at_the_end():
  stream, clock = io.StringIO(), FakeClock()
  bar = conversion_progress.Progress(10, "train", stream=stream, log_interval=30, clock=clock)
  for _ in range(4):
    clock.now += 10  # 10 s per video, 300 frames each
    bar.update(1, 300)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue() and len(lines) == 2  # at 30 s (3 videos) and at the end
  assert lines[0] == ("train: 3/10 videos (30%), 900 frames, 0.10 videos/s, 30.0 frames/s, 0 skipped, "
                      "0m30s elapsed, 1m10s left")
  assert lines[1].startswith("train: 4/10 videos (40%), 1200 frames, 0.10 videos/s, 30.0 frames/s")
  assert lines[1].endswith("0m40s elapsed, 1m00s left")


def test_terminal_line_is_redrawn_in_place_and_reused_shards_do_not_count_as_speed():
  stream, clock = Terminal(), FakeClock()
  bar = conversion_progress.Progress(4, "t", stream=stream, tty_interval=0.2, clock=clock)
  bar.update(2, 50, reused=2)  # an earlier run's shard: no time spent
  clock.now += 4
  bar.update(1, 20, skipped=0)
  clock.now += 4
  bar.update(1, 0, skipped=1)
  bar.close()
  text = stream.getvalue()
  assert text.endswith("\n") and text.count("\n") == 1 and text.count("\r\x1b[K") == 3
  assert text.split("\r\x1b[K")[-1] == ("t: 4/4 videos (100%), 70 frames, 0.25 videos/s, 8.8 frames/s, "
                                        "1 skipped, 2 reused, 0m08s elapsed\n")
