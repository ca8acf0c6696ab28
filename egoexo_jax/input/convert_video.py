"""One manifest row -> one `records.VideoRecord`: decode a segment with PyAV, resample it to at most
`fps` frames per second, resize, JPEG-encode, attach labels and teacher fields (rules in `convert.py`)."""

from __future__ import annotations

import dataclasses
import glob
import io
import math
import os
import re

import av
import numpy as np

from egoexo_jax.input import records, teacher_checks
from egoexo_jax.input.manifest import ManifestRow
from egoexo_jax.input.teacher_files import PseudoLabelError, convert_detections, load_detections

SEEK_MARGIN_SEC = 1.0  # seek this far before a segment's start, then decode forward
TRUNCATION_TOLERANCE_SEC = 1.0  # a video may end this much (or 5%) before its declared duration
RATE_MISMATCH = 0.25  # warn when the measured frame rate is off the declared one by this fraction
RATE_TOLERANCE = 0.01  # a stream within 1% of the target rate keeps every frame (29.97 fps at --fps=30)


class VideoError(Exception):
  """A video that cannot be converted (corrupt, truncated, unreadable, empty segment)."""


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
  frame_indices: list[int] | None  # decoded index of each stored frame (None after a seek)
  decoded_frames: int | None  # frames in the whole video (None unless decoded to the end from the start)
  warnings: list[str]
  declared_duration: float | None = None  # of the whole video, seconds

  @property
  def seconds(self) -> float:
    """Seconds of video the stored frames cover."""
    return len(self.jpegs) / self.fps


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
                 seek: bool, max_fps: float = 0.0) -> DecodedSegment | None:
  """One decoding pass; returns None when a seek overshot the segment start (caller retries from 0)."""
  stream = container.streams.video[0]
  time_base = float(stream.time_base)
  stream_start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
  nominal_fps = float(stream.average_rate or stream.guessed_rate or 0.0)
  resample = max_fps > 0 and not 0 < nominal_fps <= max_fps * (1 + RATE_TOLERANCE)
  if seek:
    container.seek(int((stream_start + max(0.0, start - SEEK_MARGIN_SEC)) / time_base), stream=stream)

  jpegs, times, kept = [], [], []
  last_slot = -1
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
    if resample:  # keep the first frame at or after each 1/max_fps step from the segment's first frame
      slot = math.floor((time - (times[0] if times else time)) * max_fps + 1e-3)
      if slot <= last_slot:
        continue
      last_slot = slot
    kept.append(index)
    jpegs.append(_encode_jpeg(frame, size[0], size[1], jpeg_quality))
    times.append(time)

  segment = f"[{start:g}, {'end' if end is None else format(end, 'g')})"
  if index < 0 and seek:
    raise VideoError(f"no frames in segment {segment} s: nothing decodes after seeking near {start:g} s")
  if index < 0:
    raise VideoError("zero frames decoded")
  if not jpegs:
    raise VideoError(f"no frames in segment {segment} s; decoded frames end at {last_time:.3f} s")
  fps = max_fps if resample and nominal_fps > 0 else nominal_fps
  if fps <= 0:
    if len(times) < 2 or times[-1] <= times[0]:
      raise VideoError("no frame rate in the stream and too few frames to measure one")
    fps = (len(times) - 1) / (times[-1] - times[0])
    fps = min(fps, max_fps) if resample else fps

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
      frame_indices=None if seek else kept, declared_duration=declared,
      decoded_frames=None if seek else index + 1, warnings=warnings)


def decode_segment(file: str, start: float | None, end: float | None, *, short_side: int, jpeg_quality: int,
                   from_beginning: bool = False, max_fps: float = 0.0) -> DecodedSegment:
  """Decodes the frames of [start, end) seconds of a video, resized and JPEG-encoded.

  `max_fps` > 0 resamples a faster video to that rate by dropping frames (never duplicates any; a
  stream within RATE_TOLERANCE of it keeps every frame); the segment's `fps` is then `max_fps`.

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
        decoded = _decode_pass(container, start, end, short_side=short_side, jpeg_quality=jpeg_quality, seek=seek,
                               max_fps=max_fps)
      if decoded is not None:
        return decoded
      seek = False  # the seek landed after the segment start: decode from the beginning instead
  except (av.FFmpegError, OSError) as e:
    raise VideoError(f"cannot decode: {e}") from e


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
  max_fps: float = 0.0  # 0: every frame




@dataclasses.dataclass
class RowResult:
  index: int
  row: ManifestRow
  record: records.VideoRecord | None
  failure: str | None
  warnings: list[str]
  seconds: float = 0.0  # of video stored
  source_bytes: float = 0.0  # the source file's bytes, times the fraction of it the segment covers


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
                           jpeg_quality=task.jpeg_quality, from_beginning=task.npy_path is not None,
                           max_fps=task.max_fps)
  hand_boxes = object_boxes = None
  if task.npy_path is not None:
    hand_boxes, object_boxes = convert_detections(
        load_detections(task.npy_path), task.npy_path, first_frame=decoded.first_frame,
        num_frames=len(decoded.jpegs), decoded_frames=decoded.decoded_frames,
        width=decoded.original_width, height=decoded.original_height, min_score=task.box_score_threshold,
        repair=task.repair_boxes, warnings=decoded.warnings, frame_indices=decoded.frame_indices)
  record = records.VideoRecord(
      video_id=row.video_id, fps=decoded.fps, height=decoded.height, width=decoded.width,
      frames=decoded.jpegs, labels=np.asarray(row.labels, np.int64), ego_logits=task.ego_logits,
      object_logits=task.object_logits, hand_boxes=hand_boxes, object_boxes=object_boxes)
  fraction = 1.0
  if decoded.declared_duration:
    fraction = min(1.0, decoded.seconds / decoded.declared_duration)
  return RowResult(task.index, row, record, None, decoded.warnings, seconds=decoded.seconds,
                   source_bytes=fraction * source_size(row.file))


def source_size(file: str) -> int:
  """Bytes of a video file, or of all the images of an image sequence ('.../frame_%010d.jpg')."""
  if os.path.isfile(file):
    return os.path.getsize(file)
  pattern = re.sub(r"%0?\d*d", "*", glob.escape(file))
  return sum(os.path.getsize(p) for p in glob.glob(pattern)) if pattern != glob.escape(file) else 0
