"""The record format: one tf.Example per video (or per annotated segment of a video).

Fields of each tf.Example (all written by `convert.py`, read by the pipelines):

| key             | type            | meaning                                                        |
|-----------------|-----------------|----------------------------------------------------------------|
| `video_id`      | bytes           | unique id (manifest `video_id`, else the file stem + segment)  |
| `num_frames`    | int64           | number of stored frames                                        |
| `fps`           | float           | frames per second of the stored frames                         |
| `height/width`  | int64           | size of the stored (resized) frames                            |
| `frames`        | bytes[num_frames] | JPEG-encoded RGB frames                                      |
| `labels`        | int64[]         | class ids (one for single-label data, several for multi-label) |
| `ego_logits`    | float[2]        | optional: Ego-Score teacher logits (ego, exo)                  |
| `object_logits` | float[K]        | optional: Object-Score teacher logits, averaged over frames    |
| `hand_boxes`    | float[N*6]      | optional: rows (frame, x1, y1, x2, y2, score)                  |
| `object_boxes`  | float[N*6]      | optional: rows (frame, x1, y1, x2, y2, score)                  |

Box coordinates are normalised to [0, 1] by the stored frame's width and height, so they
survive any later resize; `frame` indexes the stored frames. An absent box key means "no
detector output for this video" (the interaction loss is masked); a present empty list means
"the detector ran and found nothing" (all-zero maps are the target). Valid box rows are finite, have
0 <= x1 <= x2 <= 1, 0 <= y1 <= y2 <= 1 and a score in [0, 1] (`box_problem`); the converter refuses
or repairs other rows at write time and the training transforms skip a record holding one.

Records are framed as TFRecord (length, masked CRC32C of the length, data, masked CRC32C of
the data), byte-compatible with `tf.data.TFRecordDataset`, or stored in ArrayRecord files.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import BinaryIO, Iterator

import google_crc32c
import numpy as np
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2
from tensorflow_datasets.proto import tf_feature_generated_pb2 as feature_pb2

BOX_COLUMNS = 6  # frame, x1, y1, x2, y2, score


class RecordError(ValueError):
  """A record that cannot be read; the message names the file, the record and the field."""


@dataclasses.dataclass
class VideoRecord:
  """One decoded-to-bytes video: JPEG frames plus labels and optional teacher signals."""

  video_id: str
  fps: float
  height: int
  width: int
  frames: list[bytes]
  labels: np.ndarray  # int64 (L,)
  ego_logits: np.ndarray | None = None  # float32 (2,)
  object_logits: np.ndarray | None = None  # float32 (K,)
  hand_boxes: np.ndarray | None = None  # float32 (N, 6)
  object_boxes: np.ndarray | None = None  # float32 (N, 6)

  @property
  def num_frames(self) -> int:
    return len(self.frames)


def box_problem(rows: np.ndarray) -> str | None:
  """What is wrong with the first invalid row of (N, 6) box rows (frame, x1, y1, x2, y2, score), naming the
  row and its frame; None when every row is valid (finite, corners in [0, 1] and ordered, score in [0, 1])."""
  rows = np.asarray(rows, np.float32).reshape(-1, BOX_COLUMNS)
  checks = (
      (~np.all(np.isfinite(rows), axis=1), "has a non-finite value"),
      (np.any((rows[:, 1:5] < 0) | (rows[:, 1:5] > 1), axis=1), "has a coordinate outside [0, 1]"),
      ((rows[:, 3] < rows[:, 1]) | (rows[:, 4] < rows[:, 2]), "is inverted (x2 < x1 or y2 < y1)"),
      ((rows[:, 5] < 0) | (rows[:, 5] > 1), "has a score outside [0, 1]"),
  )
  for bad, what in checks:
    if bad.any():
      k = int(np.argmax(bad))
      return (f"box row {k} (frame {rows[k, 0]:g}) {what}: {np.round(rows[k, 1:].astype(float), 4).tolist()} "
              f"({int(bad.sum())} such rows)")
  return None


# --------------------------------------------------------------------------- tf.Example


def _floats(values) -> feature_pb2.Feature:
  return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=np.asarray(values, np.float32).ravel()))


def _ints(values) -> feature_pb2.Feature:
  return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=np.asarray(values, np.int64).ravel()))


def _bytes(values) -> feature_pb2.Feature:
  return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=list(values)))


def encode_example(record: VideoRecord) -> bytes:
  """Serialises a VideoRecord as a tf.Example."""
  feature = {
      "video_id": _bytes([record.video_id.encode()]),
      "num_frames": _ints([record.num_frames]),
      "fps": _floats([record.fps]),
      "height": _ints([record.height]),
      "width": _ints([record.width]),
      "frames": _bytes(record.frames),
      "labels": _ints(record.labels),
  }
  for key in ("ego_logits", "object_logits"):
    value = getattr(record, key)
    if value is not None:
      feature[key] = _floats(value)
  for key in ("hand_boxes", "object_boxes"):
    value = getattr(record, key)
    if value is not None:
      value = np.asarray(value, np.float32).reshape(-1, BOX_COLUMNS)
      feature[key] = _floats(value)
  example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
  return example.SerializeToString(deterministic=True)  # same bytes in every process


def decode_example(data: bytes, where: str = "<record>") -> VideoRecord:
  """Parses a serialised tf.Example; `where` (e.g. 'file.tfrecord#12') is used in errors."""
  try:
    feature = example_pb2.Example.FromString(data).features.feature
  except Exception as e:  # protobuf raises DecodeError, but be safe about its type
    raise RecordError(f"{where}: not a tf.Example ({e})") from e

  def get(key: str, kind: str, required: bool = True):
    if key not in feature:
      if required:
        raise RecordError(f"{where}: missing required field '{key}'")
      return None
    return getattr(feature[key], kind).value

  frames = list(get("frames", "bytes_list"))
  num_frames = get("num_frames", "int64_list")
  if len(num_frames) != 1 or num_frames[0] != len(frames):
    raise RecordError(
        f"{where}: field 'num_frames' says {list(num_frames)} but 'frames' holds {len(frames)} frames")
  if not frames:
    raise RecordError(f"{where}: field 'frames' is empty")

  def boxes(key):
    value = get(key, "float_list", required=False)
    if value is None:
      return None
    if len(value) % BOX_COLUMNS:
      raise RecordError(f"{where}: field '{key}' has {len(value)} values, not a multiple of {BOX_COLUMNS}")
    value = np.asarray(value, np.float32).reshape(-1, BOX_COLUMNS)
    if len(value) and (value[:, 0].min() < 0 or value[:, 0].max() >= len(frames)):
      raise RecordError(f"{where}: field '{key}' has frame indices outside [0, {len(frames)})")
    return value

  def floats(key):
    value = get(key, "float_list", required=False)
    return None if value is None else np.asarray(value, np.float32)

  return VideoRecord(
      video_id=get("video_id", "bytes_list")[0].decode(),
      fps=float(get("fps", "float_list")[0]),
      height=int(get("height", "int64_list")[0]),
      width=int(get("width", "int64_list")[0]),
      frames=frames,
      labels=np.asarray(get("labels", "int64_list"), np.int64),
      ego_logits=floats("ego_logits"),
      object_logits=floats("object_logits"),
      hand_boxes=boxes("hand_boxes"),
      object_boxes=boxes("object_boxes"),
  )


# --------------------------------------------------------------------------- TFRecord framing

_HEADER = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC32C: rotate right by 15 and add a constant."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(f: BinaryIO, data: bytes) -> None:
  """Appends one record to an open TFRecord file."""
  header = _HEADER.pack(len(data))
  f.write(header)
  f.write(_CRC.pack(masked_crc32c(header)))
  f.write(data)
  f.write(_CRC.pack(masked_crc32c(data)))


def scan_tfrecord(path: str) -> Iterator[tuple[int, int]]:
  """Yields (offset of data, length) for each record, checking each header's CRC.

  Reads only the 12-byte headers and seeks over the payloads, so indexing a file is cheap.
  """
  with open(path, "rb") as f:
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    index = 0
    while f.tell() < size:
      start = f.tell()
      header = f.read(_HEADER.size + _CRC.size)
      if len(header) < _HEADER.size + _CRC.size:
        raise RecordError(f"{path}#{index}: truncated record header at byte {start}")
      (length,) = _HEADER.unpack_from(header)
      (crc,) = _CRC.unpack_from(header, _HEADER.size)
      if crc != masked_crc32c(header[:_HEADER.size]):
        raise RecordError(f"{path}#{index}: corrupt record header (length CRC mismatch) at byte {start}")
      data_offset = start + len(header)
      if data_offset + length + _CRC.size > size:
        raise RecordError(f"{path}#{index}: truncated record: needs {length} bytes at byte {data_offset}, "
                          f"file has {size}")
      yield data_offset, length
      f.seek(data_offset + length + _CRC.size)
      index += 1


def read_tfrecord_at(fd: int, offset: int, length: int, where: str) -> bytes:
  """Reads one record's payload at a known offset of an open file descriptor and checks its CRC.

  Uses pread, which keeps no shared file position, so Grain's read threads can share one descriptor.
  """
  chunk = os.pread(fd, length + _CRC.size, offset)
  if len(chunk) != length + _CRC.size:
    raise RecordError(f"{where}: truncated record payload")
  data = chunk[:length]
  if _CRC.unpack_from(chunk, length)[0] != masked_crc32c(data):
    raise RecordError(f"{where}: corrupt record payload (data CRC mismatch)")
  return data
