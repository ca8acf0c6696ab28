"""Random-access sources of VideoRecords for Grain, over TFRecord or ArrayRecord shards.

Grain reads TFRecord only sequentially; `TFRecordSource` indexes each shard once (it reads the
12-byte record headers and seeks over payloads) so TFRecords get what ArrayRecord gives:
global shuffling and an iterator state that is just an index. Every record read is CRC-checked,
and any error names the shard and the record number.
"""

from __future__ import annotations

import bisect
import glob
import os
from typing import Sequence

import numpy as np

from egoexo_jax.input import records


def expand_pattern(pattern: str) -> list[str]:
  """Comma-separated glob patterns -> sorted list of files; an empty match is an error."""
  paths = []
  for part in pattern.split(","):
    matched = sorted(glob.glob(os.path.expanduser(part.strip())))
    if not matched:
      raise FileNotFoundError(f"no record files match '{part.strip()}'")
    paths.extend(matched)
  return paths


def locate(file_starts: Sequence[int], index: int) -> tuple[int, int]:
  """Global record index -> (shard number, record number inside that shard)."""
  file_index = bisect.bisect_right(file_starts, index) - 1
  return file_index, index - file_starts[file_index]


class TFRecordSource:
  """Random access to the records of TFRecord shards; items are decoded `VideoRecord`s."""

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)
    offsets, lengths, file_starts = [], [], []
    for path in self._paths:
      file_starts.append(len(offsets))
      for offset, length in records.scan_tfrecord(path):
        offsets.append(offset)
        lengths.append(length)
    self._offsets = np.asarray(offsets, np.int64)
    self._lengths = np.asarray(lengths, np.int64)
    self._file_starts = file_starts
    self._fds = {}  # opened lazily, per process (the source is pickled into Grain workers)

  def __len__(self) -> int:
    return len(self._offsets)

  def where(self, index: int) -> str:
    file_index, record = locate(self._file_starts, index)
    return f"{self._paths[file_index]}#{record}"

  def __getitem__(self, index: int) -> records.VideoRecord:
    file_index, record = locate(self._file_starts, index)
    fd = self._fds.get(file_index)
    if fd is None:  # a race here opens a descriptor twice, which is harmless
      fd = self._fds[file_index] = os.open(self._paths[file_index], os.O_RDONLY)
    where = f"{self._paths[file_index]}#{record}"
    data = records.read_tfrecord_at(fd, int(self._offsets[index]), int(self._lengths[index]), where)
    return records.decode_example(data, where)

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fds"] = {}
    return state

  def __del__(self):
    for fd in getattr(self, "_fds", {}).values():
      os.close(fd)

  def __repr__(self) -> str:
    return f"TFRecordSource({len(self._paths)} files, {len(self)} records)"


class ArrayRecordSource:
  """Random access to ArrayRecord shards; items are decoded `VideoRecord`s."""

  def __init__(self, paths: Sequence[str]):
    import grain  # pylint: disable=g-import-not-at-top

    self._paths = list(paths)
    self._source = grain.sources.ArrayRecordDataSource(self._paths)
    sizes = [len(grain.sources.ArrayRecordDataSource([p])) for p in self._paths]
    self._file_starts = list(np.cumsum([0] + sizes[:-1]))

  def __len__(self) -> int:
    return len(self._source)

  def where(self, index: int) -> str:
    file_index, record = locate(self._file_starts, index)
    return f"{self._paths[file_index]}#{record}"

  def __getitem__(self, index: int) -> records.VideoRecord:
    return records.decode_example(self._source[index], self.where(index))

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self._paths)} files, {len(self)} records)"


def open_records(pattern: str) -> TFRecordSource | ArrayRecordSource:
  """Opens record shards by glob; the format follows the file names (`.tfrecord` / `.array_record`)."""
  paths = expand_pattern(pattern)
  kinds = {"array_record" if ".array_record" in os.path.basename(p) else "tfrecord" for p in paths}
  if len(kinds) > 1:
    raise ValueError(f"'{pattern}' mixes TFRecord and ArrayRecord files; use one format per source")
  return ArrayRecordSource(paths) if kinds == {"array_record"} else TFRecordSource(paths)
