"""Teacher files for the converter (formats in `convert.py`'s docstring): logit pickles and the
per-frame hand/object detector output, turned into record fields."""

from __future__ import annotations

import json
import os
import pickle
from typing import Sequence

import numpy as np

from egoexo_jax.input import records, teacher_checks

NPY_LENGTH_TOLERANCE = 2  # frames of disagreement allowed between an .npy and the decoded video


class PseudoLabelError(ValueError):
  """A malformed or incomplete teacher file; the message names the file (and video path)."""


def load_logit_files(paths: str, field: str, length: int | None = None) -> dict[str, np.ndarray]:
  """Merges comma-separated {key: logits} pickles, e.g. one per scorer process over a group of shards.

  A key found in two files must carry the same vector there; every vector must have the same length.
  """
  merged, origin = {}, {}
  for path in (p.strip() for p in paths.split(",") if p.strip()):
    table = load_logits(path, field, length)
    for key, vector in table.items():
      if key in merged and not np.array_equal(merged[key], vector):
        raise PseudoLabelError(f"{path}: entry '{key}' differs from the one in {origin[key]}")
      merged[key], origin[key] = vector, path
    if length is None and table:
      length = len(next(iter(table.values())))
  return merged


def load_logits(pickle_path: str, field: str, length: int | None = None) -> dict[str, np.ndarray]:
  """Loads a {video path: logits} pickle; every vector must have the same length (`length` if given)."""
  try:
    with open(pickle_path, "rb") as f:
      table = pickle.load(f)
  except (OSError, pickle.UnpicklingError, EOFError) as e:
    raise PseudoLabelError(f"{pickle_path}: cannot read the {field} pickle ({e})") from e
  if not isinstance(table, dict):
    raise PseudoLabelError(
        f"{pickle_path}: expected a dict {{video path: logits}} for {field}, found {type(table).__name__}")
  logits = {}
  reference = f"{field} has {length} values" if length is not None else None
  for key, value in table.items():
    vector = np.squeeze(np.asarray(value, np.float32))
    if vector.ndim != 1:
      raise PseudoLabelError(
          f"{pickle_path}: entry '{key}' has shape {np.shape(value)}; {field} must be one vector per video")
    if length is None:
      length, reference = len(vector), f"entry '{key}' has {len(vector)}"
    if len(vector) != length:
      raise PseudoLabelError(f"{pickle_path}: entry '{key}' has {len(vector)} {field}, but {reference}")
    if not np.all(np.isfinite(vector)):
      raise PseudoLabelError(f"{pickle_path}: entry '{key}' has non-finite {field}")
    logits[str(key)] = vector
  return logits


def hand_object_npy_path(hand_object_dir: str, manifest_path: str) -> str:
  """Where the detector output for a manifest path lives: its path under the dir, extension .npy.

  An absolute manifest path is placed under the dir without its leading separator.
  """
  return os.path.join(hand_object_dir, os.path.splitext(manifest_path)[0].lstrip(os.sep) + ".npy")


def find_detections(hand_object_dir: str, manifest_path: str) -> str | None:
  """The detector file for a manifest path: its .npy, else its .json, else None."""
  npy = hand_object_npy_path(hand_object_dir, manifest_path)
  for candidate in (npy, os.path.splitext(npy)[0] + ".json"):
    if os.path.exists(candidate):
      return candidate
  return None


def _load_json_detections(json_path: str) -> list:
  """A JSON per-frame list of null or {"objects": [...], "hands": [...]} -> (objects, hands) pairs."""
  try:
    with open(json_path) as f:
      frames = json.load(f)
  except (OSError, ValueError) as e:
    raise PseudoLabelError(f"{json_path}: cannot read the hand/object detections ({e})") from e
  if not isinstance(frames, list):
    raise PseudoLabelError(f"{json_path}: expected a JSON list with one entry per decoded frame")
  entries = []
  for k, frame in enumerate(frames):
    if frame is None:
      entries.append(None)
      continue
    if not isinstance(frame, dict) or set(frame) - {"objects", "hands"}:
      raise PseudoLabelError(f"{json_path}: frame {k} must be null or an object with keys 'objects' and "
                             f"'hands', found {frame if not isinstance(frame, dict) else sorted(frame)}")
    pair = []
    for key in ("objects", "hands"):
      try:
        boxes = np.asarray(frame.get(key) or np.zeros((0, 5)), np.float32)
      except ValueError as e:
        raise PseudoLabelError(f"{json_path}: frame {k}: '{key}' is not a list of equal-length boxes ({e})") from e
      pair.append(boxes)
    entries.append(tuple(pair))
  return entries


def load_detections(npy_path: str) -> list:
  """The per-frame (object_detections, hand_detections) list saved in an .npy (or .json) file."""
  if npy_path.endswith(".json"):
    return _load_json_detections(npy_path)
  try:
    entries = np.load(npy_path, allow_pickle=True)
  except (OSError, ValueError, pickle.UnpicklingError) as e:
    raise PseudoLabelError(f"{npy_path}: cannot read the hand/object detections ({e})") from e
  if entries.ndim == 0:  # np.save of a list wrapped in a 0-d object array
    entries = entries.item()
  return list(entries)


def _detections_to_rows(detections, frame: int, width: int, height: int, where: str,
                        min_score: float = 0.0, repair: bool = False, warnings: list | None = None) -> np.ndarray:
  """N x >=5 [x1, y1, x2, y2, score, ...] in pixels -> rows [frame, x1, y1, x2, y2, score] in [0, 1].

  Rows are checked first (teacher_checks: refused, or with `repair` mended and a note appended to
  `warnings`); then detections scoring under `min_score` are dropped.
  """
  if detections is None:
    return np.zeros((0, records.BOX_COLUMNS), np.float32)
  detections = np.asarray(detections, np.float32)
  if detections.size == 0:
    return np.zeros((0, records.BOX_COLUMNS), np.float32)
  if detections.ndim != 2 or detections.shape[1] < 5:
    raise PseudoLabelError(f"{where}: detections of shape {detections.shape}; expected N x >=5 "
                           "[x1, y1, x2, y2, score, ...]")
  detections, notes = teacher_checks.check_detections(detections, where, repair)
  if warnings is not None:
    warnings.extend(notes)
  detections = detections[detections[:, 4] >= min_score]
  scale = np.array([width, height, width, height], np.float32)
  coords = np.clip(detections[:, :4] / scale, 0.0, 1.0)
  rows = np.concatenate([np.full((len(detections), 1), frame, np.float32), coords, detections[:, 4:5]], axis=1)
  return rows.astype(np.float32)


def convert_detections(entries: Sequence, npy_path: str, *, first_frame: int, num_frames: int,
                       decoded_frames: int, width: int, height: int, min_score: float = 0.0,
                       repair: bool = False, warnings: list | None = None,
                       frame_indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Detector output over a whole video -> (hand_boxes, object_boxes) rows for a stored segment.

  `entries[k]` belongs to decoded frame k of the original video; the segment is the decoded frames
  [first_frame, first_frame + num_frames), or, when frames were dropped to resample the video
  (`--fps`), stored frame j is decoded frame `frame_indices[j]`. `width`/`height` are the original
  decoded frame size.
  """
  if abs(len(entries) - decoded_frames) > NPY_LENGTH_TOLERANCE:
    raise PseudoLabelError(
        f"{npy_path}: holds detections for {len(entries)} frames but the video decodes to {decoded_frames} "
        f"frames (at most {NPY_LENGTH_TOLERANCE} frames of difference are allowed)")
  if frame_indices is None:
    frame_indices = range(first_frame, first_frame + num_frames)
  hands, objects = [], []
  for stored, k in enumerate(frame_indices):
    if k >= len(entries):
      break
    entry = entries[k]
    if entry is None:
      continue
    if len(entry) != 2:
      raise PseudoLabelError(f"{npy_path}: frame {k} holds {len(entry)} items; expected a pair "
                             "(object_detections, hand_detections)")
    where = f"{npy_path}: frame {k}"
    objects.append(_detections_to_rows(entry[0], stored, width, height, where + " (objects)", min_score,
                                       repair, warnings))
    hands.append(_detections_to_rows(entry[1], stored, width, height, where + " (hands)", min_score,
                                     repair, warnings))
  empty = np.zeros((0, records.BOX_COLUMNS), np.float32)
  return (np.concatenate(hands) if hands else empty), (np.concatenate(objects) if objects else empty)


def teacher_vectors(rows, table, table_path, field, allow_missing) -> tuple[list, list[str]]:
  """Per-row vectors from a {path or video_id: logits} table; missing keys are an error unless allowed."""
  if table is None:
    return [None] * len(rows), []
  missing = [row for row in rows if row.path not in table and row.video_id not in table]
  if missing and not allow_missing:
    row = missing[0]
    raise PseudoLabelError(
        f"{table_path}: no {field} for video '{row.path}' (video_id '{row.video_id}', manifest line {row.line}); "
        f"{len({r.path for r in missing})} manifest paths are missing. Pass allow_missing_pseudo_labels "
        f"(--allow_missing_pseudo_labels) to leave the field absent for them")
  vectors = [table[row.path] if row.path in table else table.get(row.video_id) for row in rows]
  return vectors, list(dict.fromkeys(row.path for row in missing))
