"""Random-access sources of VideoRecords for Grain, over TFRecord or ArrayRecord shards.

Grain reads TFRecord only sequentially; `TFRecordSource` indexes each shard once (it reads the
12-byte record headers and seeks over payloads) so TFRecords get what ArrayRecord gives:
global shuffling and an iterator state that is just an index. Every record read is CRC-checked,
and any error names the shard and the record number.

Opening (`open_records`) decides which files a pattern means and whether they make a whole dataset:
  * A pattern is a comma-separated list of entries; an entry is a path or a glob. A path that exists
    is taken literally, and the part of an entry that names existing folders is matched literally
    (glob.escape), so a workdir called `run[1]` or `a,b` works; commas split the list only where the
    pieces are not themselves part of an existing path (the longest matching entry wins).
  * Shard sets named `<prefix>-0000i-of-0000N` that a glob matches must be complete: a missing shard
    is an error naming it, always (not only under strictness). A missing shard silently changes the
    dataset and every record index after it, so a resumed run would draw other records than its
    checkpointed position means. A shard named literally (no glob) is taken alone, as asked.
  * A TFRecord shard whose framing is damaged (a corrupt record header, a truncated file) keeps the
    records before the damage and loses the rest, with a loud warning per shard; with `strict` (the
    trainer's `data.strict`) the first damaged shard is an error. An ArrayRecord shard that cannot be
    opened is skipped likewise.
  * A pattern that holds no records at all is an error naming it. The opened shard and record counts
    are logged.
"""

from __future__ import annotations

import bisect
import glob
import os
import re
from typing import Sequence

import numpy as np
from absl import logging

from egoexo_jax.input import records


def _match(entry: str) -> tuple[list[str], bool]:
  """(the files one entry means, whether it named an existing file literally): itself when it exists,
  else a glob whose existing-folder part is literal."""
  entry = os.path.expanduser(entry.strip())
  if not entry:
    return [], False
  if os.path.isfile(entry):
    return [entry], True
  head, parts = entry, []
  while head and not os.path.isdir(head):  # the longest existing folder at the start of the entry
    head, tail = os.path.split(head)
    parts.insert(0, tail)
    if not tail:
      break
  if head and parts:
    entry = os.path.join(glob.escape(head), *parts)
  return sorted(p for p in glob.glob(entry) if os.path.isfile(p)), False


def _expand(pattern: str) -> list[tuple[list[str], bool]]:
  """(files, literal) per entry of a comma-separated pattern (see expand_pattern)."""
  pieces, entries, i = pattern.split(","), [], 0
  while i < len(pieces):
    for j in range(len(pieces), i, -1):
      matched, literal = _match(",".join(pieces[i:j]))
      if matched:
        entries.append((matched, literal))
        i = j
        break
    else:
      raise FileNotFoundError(f"no record files match '{pieces[i].strip()}' (of the pattern '{pattern}')")
  return entries


def expand_pattern(pattern: str) -> list[str]:
  """Comma-separated paths or glob patterns -> sorted files per entry; an entry matching nothing is an error.

  Commas inside an existing path do not split it: from each position the longest run of
  comma-joined pieces that matches something is one entry.
  """
  return [path for matched, _ in _expand(pattern) for path in matched]


_SHARD_NAME = re.compile(r"^(?P<prefix>.*)-(?P<index>\d+)-of-(?P<count>\d+)$")


def check_shard_sets(paths: Sequence[str]) -> None:
  """Every `<prefix>-<i>-of-<N>` set among `paths` holds all N shards (module docstring: why always)."""
  sets: dict[tuple[str, str, int], set[int]] = {}
  for path in paths:
    match = _SHARD_NAME.match(path)
    if match:
      width = len(match["index"])
      sets.setdefault((match["prefix"], match["count"], width), set()).add(int(match["index"]))
  for (prefix, count, width), present in sorted(sets.items()):
    missing = [f"{prefix}-{i:0{width}d}-of-{count}" for i in range(int(count)) if i not in present]
    if missing:
      raise FileNotFoundError(
          f"{missing[0]} is missing ({len(missing)} of {int(count)} shards of '{prefix}-*-of-{count}' are missing): "
          "a partial shard set changes the dataset and the record order; restore the shard or rewrite the set")


def locate(file_starts: Sequence[int], index: int) -> tuple[int, int]:
  """Global record index -> (shard number, record number inside that shard)."""
  file_index = bisect.bisect_right(file_starts, index) - 1
  return file_index, index - file_starts[file_index]


def sample_indices(file_starts: Sequence[int], num_records: int, limit: int) -> list[int]:
  """Up to `limit` record indices for a quick content check: the first records of shards spread evenly
  over the set (record 0 of each chosen shard first, then record 1, ...)."""
  shards = len(file_starts)
  if not num_records or limit <= 0:
    return []
  spread = min(limit, shards)
  chosen = sorted({round(k * (shards - 1) / max(spread - 1, 1)) for k in range(spread)})
  ends = list(file_starts[1:]) + [num_records]
  out, depth = [], 0
  while len(out) < limit:
    row = [file_starts[s] + depth for s in chosen if file_starts[s] + depth < ends[s]]
    if not row:
      break
    out.extend(row[:limit - len(out)])
    depth += 1
  return out


class TFRecordSource:
  """Random access to the records of TFRecord shards; items are decoded `VideoRecord`s.

  `strict` False: a shard with damaged framing keeps its records before the damage (module docstring);
  `damaged` lists (path, error) of such shards.
  """

  def __init__(self, paths: Sequence[str], strict: bool = True):
    self._paths = list(paths)
    self.damaged: list[tuple[str, str]] = []
    offsets, lengths, file_starts = [], [], []
    for path in self._paths:
      file_starts.append(len(offsets))
      try:
        for offset, length in records.scan_tfrecord(path):
          offsets.append(offset)
          lengths.append(length)
      except records.RecordError as e:
        if strict:
          raise
        kept = len(offsets) - file_starts[-1]
        logging.warning("DAMAGED SHARD: %s; keeping its first %d records, the rest of the file is lost "
                        "(data.strict stops here instead)", e, kept)
        self.damaged.append((path, str(e)))
    self._offsets = np.asarray(offsets, np.int64)
    self._lengths = np.asarray(lengths, np.int64)
    self._file_starts = file_starts
    self._fds = {}  # opened lazily, per process (the source is pickled into Grain workers)

  def __len__(self) -> int:
    return len(self._offsets)

  def where(self, index: int) -> str:
    file_index, record = locate(self._file_starts, index)
    return f"{self._paths[file_index]}#{record}"

  @property
  def num_files(self) -> int:
    return len(self._paths)

  def sample_indices(self, limit: int) -> list[int]:
    return sample_indices(self._file_starts, len(self), limit)

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
  """Random access to ArrayRecord shards; items are decoded `VideoRecord`s.

  `strict` False: a shard that cannot be opened is skipped with a warning and listed in `damaged`.
  """

  def __init__(self, paths: Sequence[str], strict: bool = True):
    import grain  # pylint: disable=g-import-not-at-top

    self._paths, sizes, self.damaged = [], [], []
    for path in paths:
      try:
        sizes.append(len(grain.sources.ArrayRecordDataSource([path])))
      except (RuntimeError, ValueError) as e:  # array_record's errors for a truncated or corrupt file
        if strict:
          raise records.RecordError(f"{path}: cannot open the ArrayRecord file ({e or type(e).__name__})") from e
        logging.warning("DAMAGED SHARD: %s cannot be opened (%s); skipping the whole file "
                        "(data.strict stops here instead)", path, e)
        self.damaged.append((path, str(e)))
        continue
      self._paths.append(path)
    self._source = grain.sources.ArrayRecordDataSource(self._paths) if self._paths else []
    self._file_starts = [int(x) for x in np.cumsum([0] + sizes[:-1])] if sizes else []

  def __len__(self) -> int:
    return len(self._source)

  def where(self, index: int) -> str:
    file_index, record = locate(self._file_starts, index)
    return f"{self._paths[file_index]}#{record}"

  def __getitem__(self, index: int) -> records.VideoRecord:
    try:
      data = self._source[index]
    except RuntimeError as e:  # array_record's error for a corrupt chunk
      raise records.RecordError(f"{self.where(index)}: cannot read the record ({e})") from e
    return records.decode_example(data, self.where(index))

  @property
  def num_files(self) -> int:
    return len(self._paths)

  def sample_indices(self, limit: int) -> list[int]:
    return sample_indices(self._file_starts, len(self), limit)

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self._paths)} files, {len(self)} records)"


def open_records(pattern: str, strict: bool = True) -> TFRecordSource | ArrayRecordSource:
  """Opens record shards by pattern (expand_pattern); the format follows the file names (`.tfrecord` /
  `.array_record`). Shard sets must be complete; damaged shards are an error when `strict`, else
  skipped past with a warning (module docstring); no records at all is an error naming the pattern."""
  entries = _expand(pattern)
  paths = [path for matched, _ in entries for path in matched]
  check_shard_sets([path for matched, literal in entries if not literal for path in matched])
  kinds = {"array_record" if ".array_record" in os.path.basename(p) else "tfrecord" for p in paths}
  if len(kinds) > 1:
    raise ValueError(f"'{pattern}' mixes TFRecord and ArrayRecord files; use one format per source")
  source = ArrayRecordSource(paths, strict) if kinds == {"array_record"} else TFRecordSource(paths, strict)
  if not len(source):
    raise records.RecordError(f"'{pattern}' matches {len(paths)} files but they hold no records"
                              + (f" ({len(source.damaged)} damaged; see the warnings above)" if source.damaged else ""))
  logging.info("Opened %d record files (%d records) for '%s'%s.", len(paths), len(source), pattern,
               f"; {len(source.damaged)} DAMAGED, records past the damage lost" if source.damaged else "")
  return source
