"""The converter's CSV manifest (columns documented in `convert.py`): rows read and validated."""

from __future__ import annotations

import dataclasses
import math
import os

from egoexo_jax.input import csv_rows


class ManifestError(ValueError):
  """A malformed manifest; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  """One data row of the manifest, validated."""

  line: int  # line number in the manifest file (the header is line 1)
  path: str  # as written in the manifest: the key into teacher files
  file: str  # the path resolved against the manifest's folder
  labels: tuple[int, ...]
  video_id: str
  start_sec: float | None
  end_sec: float | None


def _parse_seconds(text: str, column: str, where: str) -> float | None:
  text = (text or "").strip()
  if not text:
    return None
  try:
    value = float(text)
  except ValueError:
    raise ManifestError(f"{where}: column '{column}' is '{text}', not a number of seconds") from None
  if not math.isfinite(value) or value < 0:
    raise ManifestError(f"{where}: column '{column}' is {text}; it must be a finite number >= 0")
  return value


def _default_video_id(path: str, start: float | None, end: float | None) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  if start is None and end is None:
    return stem
  return f"{stem}_{start or 0:g}-{'end' if end is None else format(end, 'g')}"


def read_manifest(manifest_path: str) -> list[ManifestRow]:
  """Reads and validates a manifest; any problem raises ManifestError naming the line."""
  folder = os.path.dirname(os.path.abspath(manifest_path))
  rows, seen_ids = [], {}
  for line, where, fields in csv_rows.read_csv_rows(manifest_path, ("path", "labels"), ManifestError):
    path = (fields.get("path") or "").strip()
    if not path:
      raise ManifestError(f"{where}: column 'path' is empty")
    label_text = (fields.get("labels") or "").strip()
    try:
      labels = tuple(int(x) for x in label_text.split())
    except ValueError:
      raise ManifestError(
          f"{where}: column 'labels' is '{label_text}'; expected class ids separated by spaces") from None
    if not labels:
      raise ManifestError(f"{where}: column 'labels' is empty")
    if min(labels) < 0:
      raise ManifestError(f"{where}: column 'labels' has a negative class id: '{label_text}'")
    if len(set(labels)) != len(labels):
      raise ManifestError(f"{where}: column 'labels' repeats a class id: '{label_text}'")
    start = _parse_seconds(fields.get("start_sec"), "start_sec", where)
    end = _parse_seconds(fields.get("end_sec"), "end_sec", where)
    if end is not None and end <= (start or 0.0):
      raise ManifestError(f"{where}: end_sec {end:g} is not after start_sec {start or 0:g}")
    video_id = (fields.get("video_id") or "").strip() or _default_video_id(path, start, end)
    if video_id in seen_ids:
      raise ManifestError(f"{where}: video_id '{video_id}' was already used on line {seen_ids[video_id]}")
    seen_ids[video_id] = line
    rows.append(ManifestRow(
        line=line, path=path, file=os.path.join(folder, path), labels=labels,
        video_id=video_id, start_sec=start, end_sec=end))
  if not rows:
    raise ManifestError(f"{manifest_path}: no data rows")
  return rows
