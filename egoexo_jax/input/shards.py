"""Record shards of the converter: atomic writing, per-shard completion markers (resume), the summary.

A conversion writes shard i of every format from manifest rows i, i + N, i + 2N, ... (in manifest order),
one shard at a time. A finished shard is renamed to a hidden "complete" name and gets a hidden done
marker: JSON with a fingerprint of its inputs and settings, its files' sizes and the statistics of its
records. A run that is killed leaves those behind; the next run with the same inputs and settings keeps
every shard whose marker matches (its files are neither rewritten nor touched) and converts the rest.
When all shards are complete they are renamed to their final names together, the summary JSON is written
and the markers are removed, so readers globbing the final names never see part of a dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from egoexo_jax import atomic_files
from egoexo_jax.input import records

FORMATS = ("tfrecord", "array_record")


def shard_paths(output_prefix: str, fmt: str, num_shards: int) -> list[str]:
  return [f"{output_prefix}.{fmt}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


class ShardSet:
  """The shards of one format, written under hidden temporary names and renamed into place on commit.

  The temporary names start with '.', so no glob of the final names ever matches a partial file.
  """

  def __init__(self, output_prefix: str, fmt: str, num_shards: int):
    self.fmt = fmt
    self.paths = shard_paths(output_prefix, fmt, num_shards)
    self._temps = [atomic_files.temporary_name(p) for p in self.paths]
    self._writers = []
    for temp in self._temps:
      if fmt == "array_record":
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
        self._writers.append(array_record_module.ArrayRecordWriter(temp, "group_size:1"))
      else:
        self._writers.append(open(temp, "wb"))

  def write(self, shard: int, data: bytes) -> None:
    if self.fmt == "array_record":
      self._writers[shard].write(data)
    else:
      records.write_tfrecord(self._writers[shard], data)

  def _close(self) -> None:
    for writer in self._writers:
      writer.close()
    self._writers = []

  def commit(self) -> None:
    self._close()
    for temp, path in zip(self._temps, self.paths):
      os.replace(temp, path)

  def abort(self) -> None:
    try:
      self._close()
    finally:
      for temp in self._temps:
        if os.path.exists(temp):
          os.remove(temp)


def check_no_stale_shards(output_prefix: str, formats: Sequence[str], num_shards: int) -> None:
  """Shards of an earlier run with another shard count would be globbed together with ours."""
  for fmt in formats:
    ours = set(shard_paths(output_prefix, fmt, num_shards))
    stale = sorted(set(glob.glob(f"{glob.escape(output_prefix)}.{fmt}-*-of-*")) - ours)
    if stale:
      raise FileExistsError(f"{stale[0]} (and {len(stale) - 1} more) exist from a run with another shard "
                            f"count and would match the same glob; remove them or choose another output_prefix")


def _hidden(path: str, suffix: str) -> str:
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f".{name}.{suffix}")


def complete_path(path: str) -> str:
  """Where a finished shard waits, hidden from globs of the final names, until the whole run is done."""
  return _hidden(path, "complete")


def marker_path(output_prefix: str, shard: int, num_shards: int) -> str:
  return _hidden(f"{output_prefix}.shard-{shard:05d}-of-{num_shards:05d}", "done")


def fingerprint(tasks: Sequence, formats: Sequence[str]) -> str:
  """A digest of everything that decides a shard's bytes: its rows, settings, teacher vectors, files."""
  digest = hashlib.sha256(repr(tuple(formats)).encode())
  for task in tasks:
    for field in dataclasses.fields(task):
      value = getattr(task, field.name)
      if isinstance(value, np.ndarray):
        value = (value.dtype.str, value.shape, value.tobytes())
      digest.update(f"{field.name}={value!r};".encode())
    for file in (task.row.file, task.npy_path):
      if file is not None and os.path.exists(file):
        info = os.stat(file)
        digest.update(f"{file}:{info.st_size}:{info.st_mtime_ns};".encode())
  return digest.hexdigest()


def completed_shard(output_prefix: str, shard: int, num_shards: int, formats: Sequence[str],
                    expected_fingerprint: str) -> dict | None:
  """The done marker of a shard an earlier run completed with the same inputs, or None."""
  try:
    with open(marker_path(output_prefix, shard, num_shards)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if marker.get("fingerprint") != expected_fingerprint or marker.get("formats") != list(formats):
    return None
  for fmt in formats:
    path = shard_paths(output_prefix, fmt, num_shards)[shard]
    found = [p for p in (complete_path(path), path) if os.path.exists(p)]
    if not found or os.path.getsize(found[0]) != marker["bytes"][fmt]:
      return None
  return marker


def remove_stale_partials(output_prefix: str) -> None:
  """Temporary files left by a killed run (their process id differs from ours) are removed."""
  folder, name = os.path.split(os.path.abspath(output_prefix))
  for temp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.partial-*")):
    os.remove(temp)


class ShardWriter:
  """One shard in every format, written under temporary names; `finish` makes it complete."""

  def __init__(self, output_prefix: str, shard: int, num_shards: int, formats: Sequence[str]):
    self._sets = [_OneShard(shard_paths(output_prefix, fmt, num_shards)[shard], fmt) for fmt in formats]
    self._marker = marker_path(output_prefix, shard, num_shards)
    self.formats = list(formats)

  def write(self, data: bytes) -> None:
    for one in self._sets:
      one.write(data)

  def finish(self, marker: dict) -> dict:
    """Renames the files to their complete names, then writes the done marker (with their sizes)."""
    sizes = {}
    for one in self._sets:
      sizes[one.fmt] = one.finish()
    marker = {**marker, "formats": self.formats, "bytes": sizes}
    write_json(self._marker, marker)
    return marker

  def abort(self) -> None:
    for one in self._sets:
      one.abort()


class _OneShard:
  def __init__(self, path: str, fmt: str):
    self.fmt, self.path, self._temp = fmt, path, atomic_files.temporary_name(path)
    if fmt == "array_record":
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      self._writer = array_record_module.ArrayRecordWriter(self._temp, "group_size:1")
    else:
      self._writer = open(self._temp, "wb")

  def write(self, data: bytes) -> None:
    if self.fmt == "array_record":
      self._writer.write(data)
    else:
      records.write_tfrecord(self._writer, data)

  def finish(self) -> int:
    self._writer.close()
    os.replace(self._temp, complete_path(self.path))
    return os.path.getsize(complete_path(self.path))

  def abort(self) -> None:
    try:
      self._writer.close()
    finally:
      if os.path.exists(self._temp):
        os.remove(self._temp)


def publish(output_prefix: str, num_shards: int, formats: Sequence[str]) -> list[str]:
  """Renames every complete shard to its final name (keeping its mtime); returns the final paths."""
  paths = [path for fmt in formats for path in shard_paths(output_prefix, fmt, num_shards)]
  for path in paths:
    if os.path.exists(complete_path(path)):
      os.replace(complete_path(path), path)
  return paths


def remove_markers(output_prefix: str, num_shards: int) -> None:
  for shard in range(num_shards):
    if os.path.exists(marker_path(output_prefix, shard, num_shards)):
      os.remove(marker_path(output_prefix, shard, num_shards))


def discard(output_prefix: str, num_shards: int, formats: Sequence[str]) -> None:
  """Removes this run's complete shards and markers (a failed run writes nothing)."""
  for fmt in formats:
    for path in shard_paths(output_prefix, fmt, num_shards):
      if os.path.exists(complete_path(path)):
        os.remove(complete_path(path))
  remove_markers(output_prefix, num_shards)


# --------------------------------------------------------------------------- summary


def record_entry(record: records.VideoRecord, seconds: float, source_bytes: float) -> dict:
  """What the summary keeps of one written record (also stored in its shard's done marker)."""
  return {
      "labels": record.labels.tolist(), "fps": record.fps, "num_frames": record.num_frames,
      "size": f"{record.height}x{record.width}", "seconds": seconds, "source_bytes": source_bytes,
      "fields": [f for f in FIELDS if getattr(record, f) is not None],
      "object_logits_dim": None if record.object_logits is None else len(record.object_logits),
  }


FIELDS = ("ego_logits", "object_logits", "hand_boxes", "object_boxes")


class Stats:
  """Numbers for the dataset summary JSON, from the records' entries (`record_entry`)."""

  def __init__(self):
    self.entries: list[dict] = []

  @property
  def written(self) -> int:
    return len(self.entries)

  def storage(self, shard_bytes: dict[str, int]) -> dict:
    """Bytes per second of stored video and the ratio to the source's bytes, per format."""
    seconds = sum(e["seconds"] for e in self.entries)
    source = sum(e["source_bytes"] for e in self.entries)
    return {
        "seconds_of_video": seconds, "source_bytes": round(source), "bytes": shard_bytes,
        "bytes_per_second": {f: n / seconds if seconds else None for f, n in shard_bytes.items()},
        "ratio_to_source": {f: n / source if source else None for f, n in shard_bytes.items()},
    }

  def to_json(self, **settings) -> dict:
    label_counts, sizes = {}, {}
    for e in self.entries:
      for label in e["labels"]:
        label_counts[label] = label_counts.get(label, 0) + 1
      sizes[e["size"]] = sizes.get(e["size"], 0) + 1
    labels = sorted(label_counts)
    fps = [e["fps"] for e in self.entries]
    num_frames = [e["num_frames"] for e in self.entries]
    dims = [e["object_logits_dim"] for e in self.entries if e["object_logits_dim"] is not None]
    return {
        **settings,
        "num_records": len(self.entries),
        "labels": {
            "num_classes_seen": len(labels),
            "max_label": labels[-1] if labels else None,
            "multi_label_records": sum(len(e["labels"]) > 1 for e in self.entries),
            "records_per_label": {str(k): label_counts[k] for k in labels},
        },
        "fps": {"min": min(fps, default=None), "max": max(fps, default=None)},
        "num_frames": {"min": min(num_frames, default=None), "max": max(num_frames, default=None),
                       "total": sum(num_frames)},
        "stored_sizes_hxw": sizes,
        "records_with_field": {f: sum(f in e["fields"] for e in self.entries) for f in FIELDS},
        "object_logits_dim": dims[-1] if dims else None,
    }


def write_json(path: str, content: dict) -> None:
  with atomic_files.atomic_write(path, "w") as f:
    json.dump(content, f, indent=2)
    f.write("\n")
