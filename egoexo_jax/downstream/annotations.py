"""Inputs of the downstream tasks: per-frame features, action segments, splits, views, anticipation samples.

Features: a folder `<dir>/<recording>/<view>.npy`, each (frames, dim), as `downstream.extract` writes
and as data/evgap/features/ ships. Frame t of every view of a recording is the same moment.

Segments: a CSV with header `recording,start_frame,end_frame,action,verb,object` (end exclusive;
Assembly101's fine-grained CSVs have these fields under other names). Frames that no segment covers
are unlabelled (label -1): left out of the loss and of every metric, as MS-TCN leaves out 'background'.

Splits: a CSV `recording,split` with split in train / val / test. The validation recordings pick the
checkpoint; test recordings are only scored at the end.

Novel views: `train_views` and `test_views` (view names; empty = every view). Training and validation
use the train views, the test uses the test views, so holding a view out of `train_views` and naming
only it in `test_views` scores a view the model never saw.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from egoexo_jax.input import csv_rows

SPLITS = ("train", "val", "test")
SEGMENT_COLUMNS = ("recording", "start_frame", "end_frame", "action", "verb", "object")
LENGTH_TOLERANCE = 2  # frames by which features and annotations may disagree at the end


class AnnotationError(ValueError):
  """Bad annotation or feature input; the message names the file and line or recording."""


@dataclasses.dataclass(frozen=True, order=True)
class Segment:
  """One action segment of a recording, in frames; also what input/assembly101.py writes (write_segments)."""

  start: int
  end: int  # exclusive
  action: int
  verb: int
  object: int


def read_segments(path: str) -> dict[str, list[Segment]]:
  """{recording: its segments sorted by start}; overlapping segments are an error naming the line."""
  by_recording: dict[str, list[Segment]] = {}
  for _, where, fields in csv_rows.read_csv_rows(path, SEGMENT_COLUMNS, AnnotationError):
    try:
      start, end, action, verb, obj = (int(fields[k]) for k in SEGMENT_COLUMNS[1:])
    except (TypeError, ValueError) as e:
      raise AnnotationError(f"{where}: start_frame, end_frame, action, verb, object must be integers") from e
    if not 0 <= start < end or min(action, verb, obj) < 0:
      raise AnnotationError(f"{where}: need 0 <= start_frame < end_frame and non-negative class ids")
    by_recording.setdefault(fields["recording"].strip(), []).append(Segment(start, end, action, verb, obj))
  for recording, segments in by_recording.items():
    segments.sort(key=lambda s: s.start)
    for a, b in zip(segments, segments[1:]):
      if b.start < a.end:
        raise AnnotationError(f"{path}: segments of '{recording}' overlap: [{a.start}, {a.end}) and "
                              f"[{b.start}, {b.end})")
  return by_recording


def read_split(path: str) -> dict[str, list[str]]:
  """{split: recordings}; every split must be train, val or test."""
  splits: dict[str, list[str]] = {s: [] for s in SPLITS}
  for _, where, fields in csv_rows.read_csv_rows(path, ("recording", "split"), AnnotationError):
    split = fields["split"].strip()
    if split not in SPLITS:
      raise AnnotationError(f"{where}: split '{split}' is not one of {SPLITS}")
    splits[split].append(fields["recording"].strip())
  return splits


def frame_labels(segments: Sequence[Segment], num_frames: int, field: str = "action") -> np.ndarray:
  """(num_frames,) int32 class per frame from segments (-1 where no segment lies)."""
  labels = np.full(num_frames, -1, np.int32)
  for segment in segments:
    labels[segment.start:min(segment.end, num_frames)] = getattr(segment, field)
  return labels


def available_views(features_dir: str, recording: str) -> list[str]:
  folder = os.path.join(features_dir, recording)
  if not os.path.isdir(folder):
    raise AnnotationError(f"no feature folder '{folder}' for recording '{recording}'")
  return sorted(name[:-4] for name in os.listdir(folder) if name.endswith(".npy"))


def load_features(features_dir: str, recording: str, view: str) -> np.ndarray:
  path = os.path.join(features_dir, recording, f"{view}.npy")
  try:
    features = np.load(path, allow_pickle=False)
  except OSError as e:
    raise AnnotationError(f"cannot read features '{path}' ({e})") from e
  if features.ndim != 2 or not np.isfinite(features).all():
    raise AnnotationError(f"'{path}' holds {features.dtype} {features.shape}; expected finite (frames, dim)")
  return features.astype(np.float32)


@dataclasses.dataclass
class ViewSequence:
  """One view of one recording: features (T, C) and its segments."""

  recording: str
  view: str
  features: np.ndarray
  segments: list[Segment]


def load_sequences(features_dir: str, segments: dict[str, list[Segment]], recordings: Sequence[str],
                   views: Sequence[str] = ()) -> list[ViewSequence]:
  """Every (recording, view) pair of `recordings` x `views` (empty: all views found), with segments."""
  sequences = []
  for recording in recordings:
    if recording not in segments:
      raise AnnotationError(f"recording '{recording}' has no segments")
    found = available_views(features_dir, recording)
    wanted = list(views) or found
    missing = sorted(set(wanted) - set(found))
    if missing:
      raise AnnotationError(f"recording '{recording}' has no features for views {missing} (it has {found})")
    for view in wanted:
      features = load_features(features_dir, recording, view)
      last = max(s.end for s in segments[recording])
      if last > len(features) + LENGTH_TOLERANCE:
        raise AnnotationError(f"segments of '{recording}' reach frame {last} but '{view}' has {len(features)} frames")
      sequences.append(ViewSequence(recording, view, features, segments[recording]))
  if not sequences:
    raise AnnotationError("no sequences selected")
  return sequences


def num_classes(segments: dict[str, list[Segment]], field: str) -> int:
  return 1 + max(getattr(s, field) for recording in segments.values() for s in recording)


# --------------------------------------------------------------------------- anticipation


def anticipation_samples(sequence: ViewSequence, fps: float, anticipation_seconds: float, observed_frames: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The anticipation examples of one sequence (EPIC-Kitchens / Assembly101 protocol).

  For a segment starting at frame s the model sees the `observed_frames` frames ending
  tau_a = round(anticipation_seconds * fps) frames before s, i.e. [s - tau_a - observed_frames, s - tau_a),
  padded at the front with zeros (mask 0) when the recording starts later. Segments with
  s - tau_a < 1 (nothing observed) are skipped. Returns features (S, observed_frames, C), mask
  (S, observed_frames) float32, labels (S, 3) int32 (verb, object, action).
  """
  gap = int(round(anticipation_seconds * fps))
  windows, masks, labels = [], [], []
  for segment in sequence.segments:
    end = segment.start - gap
    if end < 1:
      continue
    begin = max(0, end - observed_frames)
    observed = sequence.features[begin:min(end, len(sequence.features))]
    window = np.zeros((observed_frames, sequence.features.shape[1]), np.float32)
    mask = np.zeros(observed_frames, np.float32)
    window[observed_frames - len(observed):] = observed
    mask[observed_frames - len(observed):] = 1
    windows.append(window)
    masks.append(mask)
    labels.append((segment.verb, segment.object, segment.action))
  dim = sequence.features.shape[1]
  if not windows:
    return np.zeros((0, observed_frames, dim), np.float32), np.zeros((0, observed_frames), np.float32), \
        np.zeros((0, 3), np.int32)
  return np.stack(windows), np.stack(masks), np.asarray(labels, np.int32)
