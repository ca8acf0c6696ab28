"""Files written whole or not at all: readers never see half a file, even after a crash."""

from __future__ import annotations

import contextlib
import os
from typing import IO, Iterator


def temporary_name(path: str) -> str:
  """A hidden name beside `path` (so no glob of final names matches it), unique to this process."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f".{name}.partial-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
  """Opens a temporary file beside `path`; renames it to `path` when the block ends without error.

  On an error (or Ctrl-C) the temporary file is removed and `path` is left as it was.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temp = temporary_name(path)
  try:
    with open(temp, mode) as f:
      yield f
    os.replace(temp, path)
  finally:
    if os.path.exists(temp):
      os.remove(temp)
