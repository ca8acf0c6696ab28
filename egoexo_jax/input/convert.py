"""Videos listed in a CSV manifest -> sharded TFRecord / ArrayRecord files of `records.VideoRecord`s.

    python -m egoexo_jax.input.convert --manifest=data/manifest.csv --output_prefix=/tmp/rec/sample \
        --ego_logits=data/pseudo_labels/ego_logits.pkl \
        --object_logits=data/pseudo_labels/object_logits.pkl \
        --hand_object_dir=data/pseudo_labels/hand_object --num_shards=2 --formats=tfrecord,array_record

Manifest: a CSV file with a header. Columns:
  path      the video file; a relative path is relative to the manifest's folder. The path exactly
            as written is also the key into the teacher files below.
  labels    class ids, integers separated by spaces (several for multi-label data).
  video_id  optional; default: the file stem, plus `_<start>-<end>` for a segment.
  start_sec, end_sec  optional segment of the video, in seconds from its first frame. An empty start
            means the beginning, an empty end the end of the video.
Other columns (e.g. `view`, `note`) are ignored.

Teacher signals, in the formats released by the Ego-Exo authors (all optional). The pickles are
keyed by manifest path, as the released files are, or by video_id, as egoexo_jax's own teachers
(egoexo_jax.pseudo_labels) write them; a path key wins when both match. Several pickles, comma-
separated, are merged (one per teacher process, each run over its own group of record shards):
  ego_logits       pickle of {manifest path: 2 logits (ego, exo)}      (like k400_ego_predicts.pkl)
  object_logits    pickle of {manifest path: K logits}                 (like k400_IN_predicts.pkl)
  hand_object_dir  `<dir>/<manifest path with extension .npy>`: np.save'd per-frame list over the
                   video's decoded frames of (object_detections, hand_detections), each an
                   N x >=5 array [x1, y1, x2, y2, score, ...] in decoded-frame pixels, or None.
                   Or `<dir>/<manifest path with extension .json>` (used when there is no .npy):
                   a JSON list with one entry per decoded frame, either null or
                   {"objects": [[x1, y1, x2, y2, score, ...], ...], "hands": [[...], ...]}
                   (a missing key means nothing detected), in decoded-frame pixels.
                   Boxes scoring under `box_score_threshold` (default 0.5, Ego-Exo's) are dropped.

Decisions worth knowing:
  * Frames are never upscaled: a video whose short side is already <= `short_side` is stored at its
    own size (upscaling adds bytes, not information; the pipeline resizes anyway). Boxes are
    normalised, so they do not depend on the stored size.
  * A frame's time is its presentation timestamp minus the stream's start, made non-decreasing
    along decode order (a running maximum). Some files carry disordered timestamps (data/clips/box.mp4
    does); the decoder's output order is the true display order, and the running maximum keeps every
    segment a contiguous run of decoded frames. A segment keeps the frames with time in [start, end).
  * `fps` is the stream's average frame rate (falling back to the guessed rate, then to the rate
    measured from the stored frames' timestamps). When the timestamps disagree with it by more than
    25% (data/clips/tree.avi declares 15 fps but holds 68 frames over 29.6 s) a warning is logged.
  * The hand/object `.npy` list may differ from the decoded frame count by at most
    `NPY_LENGTH_TOLERANCE` frames (decoders disagree by a frame at the end of some files; box.mp4's
    header says 456 frames, FFmpeg decodes 455). Missing tail entries count as "nothing detected",
    extra ones are ignored; a larger difference is an error naming the file. Videos with an `.npy`
    are decoded from their first frame (no seeking) so that frame indices line up.
  * A video that cannot be decoded, decodes to no frames in its segment, or stops well before its
    declared duration (a truncated file) is logged and skipped; `strict` makes it fatal. So is any
    unexpected exception while converting one video (reported with its path, never a traceback from
    the worker pool). Container metadata that is not valid UTF-8 (common in old AVI files) is ignored:
    such videos convert. Errors in the manifest or in teacher files are always fatal.
  * Detector boxes are checked at write time (teacher_checks): a video with NaN, inverted or
    out-of-[0, 1]-score boxes is refused (skipped, naming the file and frame) unless `repair_boxes`.
  * A run that writes fewer than `min_fraction_written` (default 0.5) of the manifest's videos, or none,
    writes nothing and raises ConversionError (the command exits 1). Skipping is for a few bad files
    among many; losing half or more means a systematic cause (a wrong folder or path template, a codec
    this FFmpeg lacks, a box-format mismatch), and the records would silently be another dataset.
  * Record i of the manifest (i counts data rows, skipped or not) goes to shard i % num_shards, so
    a video's shard does not depend on which other videos failed.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import multiprocessing
import os
import pickle
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import av
import numpy as np

from egoexo_jax import atomic_files
from egoexo_jax.input import csv_rows, records, teacher_checks

FORMATS = ("tfrecord", "array_record")
NPY_LENGTH_TOLERANCE = 2  # frames of disagreement allowed between an .npy and the decoded video
SEEK_MARGIN_SEC = 1.0  # seek this far before a segment's start, then decode forward
TRUNCATION_TOLERANCE_SEC = 1.0  # a video may end this much (or 5%) before its declared duration
RATE_MISMATCH = 0.25  # warn when the measured frame rate is off the declared one by this fraction


class ManifestError(ValueError):
  """A malformed manifest; the message names the file and line."""


class PseudoLabelError(ValueError):
  """A malformed or incomplete teacher file; the message names the file (and video path)."""


class VideoError(Exception):
  """A video that cannot be converted (corrupt, truncated, unreadable, empty segment)."""


class ConversionError(RuntimeError):
  """Raised in strict mode for the first video that cannot be converted; names the file."""


# --------------------------------------------------------------------------- manifest


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


# --------------------------------------------------------------------------- teacher files


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


def _load_detections(npy_path: str) -> list:
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
                       repair: bool = False, warnings: list | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Detector output over a whole video -> (hand_boxes, object_boxes) rows for a stored segment.

  `entries[k]` belongs to decoded frame k of the original video; the segment is the decoded frames
  [first_frame, first_frame + num_frames). `width`/`height` are the original decoded frame size.
  """
  if abs(len(entries) - decoded_frames) > NPY_LENGTH_TOLERANCE:
    raise PseudoLabelError(
        f"{npy_path}: holds detections for {len(entries)} frames but the video decodes to {decoded_frames} "
        f"frames (at most {NPY_LENGTH_TOLERANCE} frames of difference are allowed)")
  hands, objects = [], []
  for k in range(first_frame, min(first_frame + num_frames, len(entries))):
    entry = entries[k]
    if entry is None:
      continue
    if len(entry) != 2:
      raise PseudoLabelError(f"{npy_path}: frame {k} holds {len(entry)} items; expected a pair "
                             "(object_detections, hand_detections)")
    where = f"{npy_path}: frame {k}"
    objects.append(_detections_to_rows(entry[0], k - first_frame, width, height, where + " (objects)", min_score,
                                       repair, warnings))
    hands.append(_detections_to_rows(entry[1], k - first_frame, width, height, where + " (hands)", min_score,
                                     repair, warnings))
  empty = np.zeros((0, records.BOX_COLUMNS), np.float32)
  return (np.concatenate(hands) if hands else empty), (np.concatenate(objects) if objects else empty)


# --------------------------------------------------------------------------- decoding


@dataclasses.dataclass
class DecodedSegment:
  """The stored frames of one segment, and where they came from."""

  jpegs: list[bytes]
  fps: float
  height: int  # stored size
  width: int
  original_height: int  # decoded size
  original_width: int
  first_frame: int | None  # index of the first stored frame among all decoded frames (None after a seek)
  decoded_frames: int | None  # frames in the whole video (None unless decoded to the end from the start)
  warnings: list[str]


def stored_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(width, height) with the short side scaled to `short_side`, aspect kept; never upscales."""
  scale = min(1.0, short_side / min(width, height))
  return max(1, round(width * scale)), max(1, round(height * scale))


def _encode_jpeg(frame: av.VideoFrame, width: int, height: int, quality: int) -> bytes:
  image = frame.reformat(width=width, height=height, format="rgb24").to_image()
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def _declared_duration(container, stream) -> float | None:
  if stream.duration:
    return float(stream.duration * stream.time_base)
  if container.duration:
    return container.duration / av.time_base
  return None


def _decode_pass(container, start: float, end: float | None, *, short_side: int, jpeg_quality: int,
                 seek: bool) -> DecodedSegment | None:
  """One decoding pass; returns None when a seek overshot the segment start (caller retries from 0)."""
  stream = container.streams.video[0]
  time_base = float(stream.time_base)
  stream_start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
  nominal_fps = float(stream.average_rate or stream.guessed_rate or 0.0)
  if seek:
    container.seek(int((stream_start + max(0.0, start - SEEK_MARGIN_SEC)) / time_base), stream=stream)

  jpegs, times = [], []
  index, first_frame, last_time, reached_end = -1, None, -math.inf, False
  size = original = None
  for frame in container.decode(stream):
    index += 1
    if frame.pts is not None:
      time = frame.pts * time_base - stream_start
    else:
      time = last_time + 1.0 / nominal_fps if nominal_fps and last_time > -math.inf else 0.0
    time = max(time, last_time)
    last_time = time
    if seek and index == 0 and time > start:
      return None
    if time < start:
      continue
    if end is not None and time >= end:
      reached_end = True
      if seek:
        break  # nothing after the segment is needed
      continue  # decoding from the start counts all frames (for the detector's frame list)
    if size is None:
      original = (frame.width, frame.height)
      size = stored_size(frame.width, frame.height, short_side)
    if first_frame is None:
      first_frame = index
    jpegs.append(_encode_jpeg(frame, size[0], size[1], jpeg_quality))
    times.append(time)

  segment = f"[{start:g}, {'end' if end is None else format(end, 'g')})"
  if index < 0 and seek:
    raise VideoError(f"no frames in segment {segment} s: nothing decodes after seeking near {start:g} s")
  if index < 0:
    raise VideoError("zero frames decoded")
  if not jpegs:
    raise VideoError(f"no frames in segment {segment} s; decoded frames end at {last_time:.3f} s")
  fps = nominal_fps
  if fps <= 0:
    if len(times) < 2 or times[-1] <= times[0]:
      raise VideoError("no frame rate in the stream and too few frames to measure one")
    fps = (len(times) - 1) / (times[-1] - times[0])

  warnings = []
  if len(times) >= 2 and times[-1] > times[0]:
    measured = (len(times) - 1) / (times[-1] - times[0])
    if abs(measured - fps) > RATE_MISMATCH * fps:
      warnings.append(f"the stream declares {fps:.3f} fps but the stored frames' timestamps give "
                      f"{measured:.3f} fps (gaps or duplicated timestamps); the record says {fps:.3f}")
  declared = _declared_duration(container, stream)
  if not reached_end:
    covered = times[-1] + 1.0 / fps
    needed = declared if end is None else (end if declared is None else min(end, declared))
    if needed is not None and covered < needed - max(TRUNCATION_TOLERANCE_SEC, 0.05 * needed):
      what = f"the stream declares {declared:.3f} s" if needed == declared else f"the segment ends at {end:g} s"
      raise VideoError(f"truncated: decoded frames end at {covered:.3f} s but {what}")
    if end is not None and declared is not None and end > declared + TRUNCATION_TOLERANCE_SEC:
      warnings.append(f"segment {segment} s ends after the video ({declared:.3f} s); kept {len(jpegs)} frames")
  return DecodedSegment(
      jpegs=jpegs, fps=fps, height=size[1], width=size[0], original_height=original[1],
      original_width=original[0], first_frame=None if seek else first_frame,
      decoded_frames=None if seek else index + 1, warnings=warnings)


def decode_segment(file: str, start: float | None, end: float | None, *, short_side: int, jpeg_quality: int,
                   from_beginning: bool = False) -> DecodedSegment:
  """Decodes the frames of [start, end) seconds of a video, resized and JPEG-encoded.

  Seeks near `start` unless `from_beginning` (then every frame is decoded and counted). Raises
  VideoError for unreadable, corrupt, truncated or empty input.
  """
  start = start or 0.0
  seek = start > 0 and not from_beginning
  try:
    while True:
      with av.open(file, metadata_errors="ignore") as container:  # non-UTF-8 tags must not stop decoding
        if not container.streams.video:
          raise VideoError("no video stream")
        decoded = _decode_pass(container, start, end, short_side=short_side, jpeg_quality=jpeg_quality, seek=seek)
      if decoded is not None:
        return decoded
      seek = False  # the seek landed after the segment start: decode from the beginning instead
  except (av.FFmpegError, OSError) as e:
    raise VideoError(f"cannot decode: {e}") from e


# --------------------------------------------------------------------------- one manifest row


@dataclasses.dataclass
class RowTask:
  """Everything a worker needs to convert one manifest row."""

  index: int
  row: ManifestRow
  short_side: int
  jpeg_quality: int
  ego_logits: np.ndarray | None
  object_logits: np.ndarray | None
  npy_path: str | None  # detector output for this video (.npy or .json), if the file exists
  box_score_threshold: float = 0.5
  repair_boxes: bool = False


@dataclasses.dataclass
class RowResult:
  index: int
  row: ManifestRow
  record: records.VideoRecord | None
  failure: str | None
  warnings: list[str]


def convert_row(task: RowTask) -> RowResult:
  """Decodes one manifest row into a VideoRecord. A bad video, refused boxes or any unexpected exception
  become a failure naming the cause, not an exception; teacher-file errors (PseudoLabelError) propagate."""
  try:
    return _convert_row(task)
  except (VideoError, teacher_checks.BoxContentError) as e:
    return RowResult(task.index, task.row, None, str(e), [])
  except PseudoLabelError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (one odd video must not end the whole conversion)
    return RowResult(task.index, task.row, None, f"unexpected error: {type(e).__name__}: {e}", [])


def _convert_row(task: RowTask) -> RowResult:
  row = task.row
  decoded = decode_segment(row.file, row.start_sec, row.end_sec, short_side=task.short_side,
                           jpeg_quality=task.jpeg_quality, from_beginning=task.npy_path is not None)
  hand_boxes = object_boxes = None
  if task.npy_path is not None:
    hand_boxes, object_boxes = convert_detections(
        _load_detections(task.npy_path), task.npy_path, first_frame=decoded.first_frame,
        num_frames=len(decoded.jpegs), decoded_frames=decoded.decoded_frames,
        width=decoded.original_width, height=decoded.original_height, min_score=task.box_score_threshold,
        repair=task.repair_boxes, warnings=decoded.warnings)
  record = records.VideoRecord(
      video_id=row.video_id, fps=decoded.fps, height=decoded.height, width=decoded.width,
      frames=decoded.jpegs, labels=np.asarray(row.labels, np.int64), ego_logits=task.ego_logits,
      object_logits=task.object_logits, hand_boxes=hand_boxes, object_boxes=object_boxes)
  return RowResult(task.index, row, record, None, decoded.warnings)


# --------------------------------------------------------------------------- shard files


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


def _check_no_stale_shards(output_prefix: str, formats: Sequence[str], num_shards: int) -> None:
  """Shards of an earlier run with another shard count would be globbed together with ours."""
  for fmt in formats:
    ours = set(shard_paths(output_prefix, fmt, num_shards))
    stale = sorted(set(glob.glob(f"{glob.escape(output_prefix)}.{fmt}-*-of-*")) - ours)
    if stale:
      raise FileExistsError(f"{stale[0]} (and {len(stale) - 1} more) exist from a run with another shard "
                            f"count and would match the same glob; remove them or choose another output_prefix")


# --------------------------------------------------------------------------- summary


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did."""

  written: int
  skipped: list[tuple[str, str]]  # (video path as in the manifest, reason)
  without_boxes: list[str]  # manifest paths with no detector file although hand_object_dir was given
  missing_pseudo_labels: dict[str, list[str]]  # field -> manifest paths left without it (allow_missing)
  output_files: list[str]
  summary_file: str

  def summary_line(self) -> str:
    return (f"wrote {self.written} records, skipped {len(self.skipped)} videos, "
            f"{len(self.without_boxes)} videos without boxes, into {len(self.output_files)} files")


class _Stats:
  """Running numbers for the dataset summary JSON."""

  def __init__(self):
    self.label_counts: dict[int, int] = {}
    self.multi_label = 0
    self.fps: list[float] = []
    self.num_frames: list[int] = []
    self.sizes: dict[str, int] = {}
    self.fields = {"ego_logits": 0, "object_logits": 0, "hand_boxes": 0, "object_boxes": 0}
    self.object_logits_dim = None

  def add(self, record: records.VideoRecord) -> None:
    for label in record.labels.tolist():
      self.label_counts[label] = self.label_counts.get(label, 0) + 1
    self.multi_label += len(record.labels) > 1
    self.fps.append(record.fps)
    self.num_frames.append(record.num_frames)
    size = f"{record.height}x{record.width}"
    self.sizes[size] = self.sizes.get(size, 0) + 1
    for field in self.fields:
      self.fields[field] += getattr(record, field) is not None
    if record.object_logits is not None:
      self.object_logits_dim = len(record.object_logits)

  def to_json(self, **settings) -> dict:
    labels = sorted(self.label_counts)
    return {
        **settings,
        "num_records": len(self.num_frames),
        "labels": {
            "num_classes_seen": len(labels),
            "max_label": labels[-1] if labels else None,
            "multi_label_records": self.multi_label,
            "records_per_label": {str(k): self.label_counts[k] for k in labels},
        },
        "fps": {"min": min(self.fps, default=None), "max": max(self.fps, default=None)},
        "num_frames": {"min": min(self.num_frames, default=None), "max": max(self.num_frames, default=None),
                       "total": sum(self.num_frames)},
        "stored_sizes_hxw": self.sizes,
        "records_with_field": self.fields,
        "object_logits_dim": self.object_logits_dim,
    }


def _write_json(path: str, content: dict) -> None:
  with atomic_files.atomic_write(path, "w") as f:
    json.dump(content, f, indent=2)
    f.write("\n")


# --------------------------------------------------------------------------- conversion


def _teacher_vectors(rows, table, table_path, field, allow_missing) -> tuple[list, list[str]]:
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


def convert_manifest(manifest_path: str, output_prefix: str, *, short_side: int = 320, jpeg_quality: int = 90,
                     num_shards: int = 1, formats: Sequence[str] = ("tfrecord",), ego_logits: str | None = None,
                     object_logits: str | None = None, hand_object_dir: str | None = None,
                     allow_missing_pseudo_labels: bool = False, box_score_threshold: float = 0.5,
                     strict: bool = False, workers: int = 1, repair_boxes: bool = False,
                     min_fraction_written: float = 0.5) -> ConversionReport:
  """Converts every video of a manifest into record shards and a `<output_prefix>.json` summary.

  Raises ConversionError, writing nothing, when fewer than `min_fraction_written` of the rows (or none)
  could be written (module docstring)."""
  if not 0.0 <= min_fraction_written <= 1.0:
    raise ValueError(f"min_fraction_written is {min_fraction_written}; it must be in [0, 1]")
  formats = tuple(formats)
  if not formats or any(fmt not in FORMATS for fmt in formats) or len(set(formats)) != len(formats):
    raise ValueError(f"formats must be distinct values among {FORMATS}, got {formats}")
  if num_shards < 1 or short_side < 1 or workers < 1 or not 1 <= jpeg_quality <= 100:
    raise ValueError(f"bad settings: num_shards={num_shards}, short_side={short_side}, workers={workers}, "
                     f"jpeg_quality={jpeg_quality} (1..100)")
  rows = read_manifest(manifest_path)

  ego_table = None if ego_logits is None else load_logit_files(ego_logits, "ego_logits", length=2)
  object_table = None if object_logits is None else load_logit_files(object_logits, "object_logits")
  ego_vectors, ego_missing = _teacher_vectors(rows, ego_table, ego_logits, "ego_logits",
                                              allow_missing_pseudo_labels)
  object_vectors, object_missing = _teacher_vectors(rows, object_table, object_logits, "object_logits",
                                                    allow_missing_pseudo_labels)
  npy_paths, without_boxes = [], []
  for row in rows:
    npy = None if hand_object_dir is None else find_detections(hand_object_dir, row.path)
    if hand_object_dir is not None and npy is None:
      without_boxes.append(row.path)
    npy_paths.append(npy)
  without_boxes = list(dict.fromkeys(without_boxes))
  for path in without_boxes:
    logging.warning("%s: no hand/object detections at %s; its records carry no box fields", path,
                    hand_object_npy_path(hand_object_dir, path) + " (or .json)")

  tasks = [RowTask(i, row, short_side, jpeg_quality, ego_vectors[i], object_vectors[i], npy_paths[i],
                   box_score_threshold, repair_boxes)
           for i, row in enumerate(rows)]

  output_dir = os.path.dirname(os.path.abspath(output_prefix))
  os.makedirs(output_dir, exist_ok=True)
  _check_no_stale_shards(output_prefix, formats, num_shards)
  shard_sets, skipped, stats = [], [], _Stats()
  pool = None
  try:
    shard_sets = [ShardSet(output_prefix, fmt, num_shards) for fmt in formats]
    if workers > 1:
      pool = multiprocessing.get_context("spawn").Pool(workers)
      results = pool.imap(convert_row, tasks, chunksize=1)  # in manifest order: deterministic output
    else:
      results = map(convert_row, tasks)
    for result in results:
      where = f"{manifest_path}:{result.row.line}: {result.row.path}"
      for warning in result.warnings:
        logging.warning("%s: %s", where, warning)
      if result.failure is not None:
        if strict:
          raise ConversionError(f"{result.row.file} (manifest line {result.row.line}): {result.failure}")
        logging.warning("%s: skipped: %s", where, result.failure)
        skipped.append((result.row.path, result.failure))
        continue
      data = records.encode_example(result.record)
      for shard_set in shard_sets:
        shard_set.write(result.index % num_shards, data)
      stats.add(result.record)
    _check_written(manifest_path, len(stats.num_frames), len(rows), skipped, min_fraction_written)
  except BaseException:
    for shard_set in shard_sets:
      shard_set.abort()
    raise
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  for shard_set in shard_sets:
    shard_set.commit()

  output_files = [path for shard_set in shard_sets for path in shard_set.paths]
  summary_file = f"{output_prefix}.json"
  _write_json(summary_file, stats.to_json(
      manifest=os.path.abspath(manifest_path), skipped=len(skipped), formats=list(formats),
      num_shards=num_shards, short_side=short_side, jpeg_quality=jpeg_quality,
      teacher_files={"ego_logits": ego_logits, "object_logits": object_logits, "hand_object_dir": hand_object_dir},
      files=[os.path.basename(p) for p in output_files]))
  report = ConversionReport(
      written=len(stats.num_frames), skipped=skipped, without_boxes=without_boxes,
      missing_pseudo_labels={"ego_logits": ego_missing, "object_logits": object_missing},
      output_files=output_files, summary_file=summary_file)
  logging.info("%s: %s", manifest_path, report.summary_line())
  return report


def _check_written(manifest_path: str, written: int, total: int, skipped: list, min_fraction: float) -> None:
  """Raises ConversionError when no record, or under `min_fraction` of the rows, were written."""
  if written and written >= min_fraction * total:
    return
  reasons: dict[str, int] = {}
  for _, reason in skipped:
    reasons[reason.split(":")[0]] = reasons.get(reason.split(":")[0], 0) + 1
  common = "; ".join(f"{n} x '{r}'" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
  first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
  raise ConversionError(
      f"{manifest_path}: wrote {written} of {total} videos, under min_fraction_written={min_fraction:g}; "
      f"nothing was written. Most common reasons: {common or 'none'}{first}")


# --------------------------------------------------------------------------- command line

def _define_flags() -> None:
  """Command-line flags; defined only when run as a script, so importing this module defines none."""
  flags.DEFINE_string("manifest", None, "CSV manifest (path,labels[,video_id,start_sec,end_sec]).")
  flags.DEFINE_string("output_prefix", None, "Output files are <prefix>.<format>-0000i-of-0000N.")
  flags.DEFINE_integer("short_side", 320, "Short side of stored frames (never upscaled).")
  flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of stored frames, 1..100.")
  flags.DEFINE_integer("num_shards", 1, "Shards per format; manifest row i goes to shard i % N.")
  flags.DEFINE_list("formats", ["tfrecord"], f"Output formats, among {FORMATS}.")
  flags.DEFINE_string("ego_logits", None, "Pickle(s), comma-separated, {manifest path or video_id: 2 logits}.")
  flags.DEFINE_string("object_logits", None, "Pickle(s), comma-separated, {manifest path or video_id: K logits}.")
  flags.DEFINE_string("hand_object_dir", None, "Folder of per-video detector .npy files.")
  flags.DEFINE_bool("allow_missing_pseudo_labels", False,
                    "Leave a teacher field absent for videos missing from its pickle.")
  flags.DEFINE_float("box_score_threshold", 0.5, "Drop detector boxes scoring under this (Ego-Exo: 0.5).")
  flags.DEFINE_bool("strict", False, "Stop at the first video that cannot be converted.")
  flags.DEFINE_integer("workers", 1, "Decoding processes.")
  flags.DEFINE_bool("repair_boxes", False, "Drop NaN and inverted detector boxes and clip scores into [0, 1] "
                    "instead of refusing the video (see teacher_checks).")
  flags.DEFINE_float("min_fraction_written", 0.5, "Fail, writing nothing, when fewer than this fraction of "
                     "the manifest's videos (or none) convert.")
  flags.mark_flags_as_required(["manifest", "output_prefix"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    report = convert_manifest(
        f.manifest, f.output_prefix, short_side=f.short_side, jpeg_quality=f.jpeg_quality, num_shards=f.num_shards,
        formats=f.formats, ego_logits=f.ego_logits, object_logits=f.object_logits,
        hand_object_dir=f.hand_object_dir, allow_missing_pseudo_labels=f.allow_missing_pseudo_labels,
        box_score_threshold=f.box_score_threshold, strict=f.strict, workers=f.workers,
        repair_boxes=f.repair_boxes, min_fraction_written=f.min_fraction_written)
  except ConversionError as e:
    sys.exit(f"error: {e}")
  print(report.summary_line())
  print(f"summary: {report.summary_file}")


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
