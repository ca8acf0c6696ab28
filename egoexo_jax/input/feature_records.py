"""Per-frame feature sequences (EVGAP) -> records: one record per recording, all its views inside.

One module over 400 lines on purpose: the record format, its writer, its random-access source and the CLI must
change together.

    python -m egoexo_jax.input.feature_records --manifest=data/evgap/views.csv \
        --output_prefix=/tmp/evgap/train --num_shards=2 --formats=tfrecord,array_record

View manifest: a CSV file with a header and one row per (recording, view):
  recording  the recording (scene) id; all rows of a recording are time-synchronised views of it.
  view       the view's name, unique within the recording (e.g. 'C10118_rgb', 'HMC_84346135_mono10bit').
  kind       'ego' or 'exo'.
  path       a .npy file of shape (frames, feature_dim), float16/32/64; relative to the manifest's folder.
             Frame t of every view of a recording is the same moment.
  fps        optional; frames per second of the features (equal for all views of a recording).
Assembly101's released TSM features (one LMDB store per view) convert straight into the same records
with `python -m egoexo_jax.input.assembly101` (input/assembly101.py), which calls `write_feature_records`.

Record fields (a tf.Example, framed as TFRecord with masked CRC32C via records.py, or in ArrayRecord):

| key            | type        | meaning                                                          |
|----------------|-------------|------------------------------------------------------------------|
| `recording_id` | bytes       | manifest `recording`                                             |
| `first_frame`  | int64       | frame of the recording where this record starts (0 unless chunked) |
| `fps`          | float       | manifest `fps` (0 when absent)                                   |
| `num_frames`   | int64       | T, frames stored per view                                        |
| `feature_dim`  | int64       | C                                                                |
| `dtype`        | bytes       | 'float16' or 'float32'                                           |
| `view_names`   | bytes[V]    | manifest `view`, in manifest order                               |
| `view_kinds`   | bytes[V]    | 'ego' / 'exo'                                                    |
| `features`     | bytes[V]    | each view's (T, C) array, little-endian, C order                 |

Views of one recording whose lengths differ by at most `max_length_difference` frames are cut to the
shortest (decoders and feature extractors disagree by a frame at the end); a larger difference is an
error naming the files. `chunk_frames` > 0 stores a long recording as several records of at most that
many frames (all views together), so that reading one window does not read a whole recording:
Assembly101's 12 views x ~12k frames x 2048 float16 are ~0.6 GB per recording.

Outputs: `<prefix>.<format>-0000i-of-0000N` (record i to shard i % N), written under hidden names and
renamed when complete, then `<prefix>.json`: the index the pipeline plans windows from (recording,
first frame, frames and views of every record, and where it is) without reading any payload.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Iterable, Sequence

import numpy as np
from absl import app, flags, logging
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2
from tensorflow_datasets.proto import tf_feature_generated_pb2 as feature_pb2

from egoexo_jax import atomic_files
from egoexo_jax.input import csv_rows, records

KINDS = ("ego", "exo")
DTYPES = ("float16", "float32")
FORMATS = ("tfrecord", "array_record")


class FeatureManifestError(ValueError):
  """A view manifest or feature file that cannot be used; the message names the file and line."""


@dataclasses.dataclass
class FeatureRecording:
  """All views of one recording (or of one chunk of it): features (V, T, C)."""

  recording_id: str
  view_names: list[str]
  view_kinds: list[str]
  features: np.ndarray  # (V, T, C) float16 or float32
  fps: float = 0.0
  first_frame: int = 0

  @property
  def num_frames(self) -> int:
    return int(self.features.shape[1])

  def views_of_kind(self, kind: str) -> list[int]:
    return [i for i, k in enumerate(self.view_kinds) if k == kind]


# --------------------------------------------------------------------------- tf.Example


def encode_recording(recording: FeatureRecording) -> bytes:
  features = np.asarray(recording.features)
  if features.dtype.name not in DTYPES or features.ndim != 3 or len(features) != len(recording.view_names):
    raise ValueError(f"recording '{recording.recording_id}': features must be (views, frames, dim) float16/32, "
                     f"got {features.dtype} {features.shape} for {len(recording.view_names)} views")
  little = features.astype(features.dtype.newbyteorder("<"), copy=False)
  strings = lambda values: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=values))
  ints = lambda values: feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=values))
  values = {
      "recording_id": strings([recording.recording_id.encode()]),
      "first_frame": ints([recording.first_frame]),
      "fps": feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[recording.fps])),
      "num_frames": ints([features.shape[1]]),
      "feature_dim": ints([features.shape[2]]),
      "dtype": strings([features.dtype.name.encode()]),
      "view_names": strings([v.encode() for v in recording.view_names]),
      "view_kinds": strings([k.encode() for k in recording.view_kinds]),
      "features": strings([v.tobytes() for v in little]),
  }
  example = example_pb2.Example(features=feature_pb2.Features(feature=values))
  return example.SerializeToString(deterministic=True)


def decode_recording(data: bytes, where: str = "<record>") -> FeatureRecording:
  """Parses a serialised feature record; `where` ('file#12') names it in errors."""
  try:
    feature = example_pb2.Example.FromString(data).features.feature
  except Exception as e:  # protobuf's DecodeError
    raise records.RecordError(f"{where}: not a tf.Example ({e})") from e

  def get(key: str, kind: str):
    if key not in feature:
      raise records.RecordError(f"{where}: missing required field '{key}'")
    return list(getattr(feature[key], kind).value)

  dtype = get("dtype", "bytes_list")[0].decode()
  if dtype not in DTYPES:
    raise records.RecordError(f"{where}: field 'dtype' is '{dtype}', not one of {DTYPES}")
  frames, dim = get("num_frames", "int64_list")[0], get("feature_dim", "int64_list")[0]
  names = [v.decode() for v in get("view_names", "bytes_list")]
  kinds = [k.decode() for k in get("view_kinds", "bytes_list")]
  blobs = get("features", "bytes_list")
  if not len(names) == len(kinds) == len(blobs) or not names:
    raise records.RecordError(f"{where}: fields 'view_names', 'view_kinds', 'features' hold {len(names)}, "
                              f"{len(kinds)}, {len(blobs)} entries; they must agree and be non-empty")
  if set(kinds) - set(KINDS):
    raise records.RecordError(f"{where}: field 'view_kinds' holds {sorted(set(kinds) - set(KINDS))}, not ego/exo")
  item = np.dtype(dtype).newbyteorder("<")
  for name, blob in zip(names, blobs):
    if len(blob) != frames * dim * item.itemsize:
      raise records.RecordError(f"{where}: field 'features' of view '{name}' holds {len(blob)} bytes, but "
                                f"{frames} frames x {dim} x {dtype} need {frames * dim * item.itemsize}")
  features = np.stack([np.frombuffer(b, item).reshape(frames, dim) for b in blobs]).astype(dtype)
  return FeatureRecording(recording_id=get("recording_id", "bytes_list")[0].decode(), view_names=names,
                          view_kinds=kinds, features=features, fps=float(get("fps", "float_list")[0]),
                          first_frame=int(get("first_frame", "int64_list")[0]))


# --------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class ViewFile:
  view: str
  kind: str
  file: str
  fps: float
  where: str  # 'manifest:line'


def read_view_manifest(manifest_path: str) -> dict[str, list[ViewFile]]:
  """{recording: its views in manifest order}; errors name the manifest line."""
  folder = os.path.dirname(os.path.abspath(manifest_path))
  recordings: dict[str, list[ViewFile]] = {}
  for _, where, fields in csv_rows.read_csv_rows(manifest_path, ("recording", "view", "kind", "path"),
                                                 FeatureManifestError):
    recording, view, kind, path = (fields[k].strip() for k in ("recording", "view", "kind", "path"))
    if not recording or not view or not path:
      raise FeatureManifestError(f"{where}: empty 'recording', 'view' or 'path'")
    if kind not in KINDS:
      raise FeatureManifestError(f"{where}: column 'kind' is '{kind}'; use 'ego' or 'exo'")
    fps_text = (fields.get("fps") or "").strip()
    try:
      fps = float(fps_text) if fps_text else 0.0
    except ValueError as e:
      raise FeatureManifestError(f"{where}: column 'fps' is '{fps_text}', not a number") from e
    views = recordings.setdefault(recording, [])
    if any(v.view == view for v in views):
      raise FeatureManifestError(f"{where}: view '{view}' of recording '{recording}' is listed twice")
    if views and views[0].fps != fps:
      raise FeatureManifestError(f"{where}: fps {fps} differs from {views[0].fps} of the recording's other views "
                                 f"({views[0].where}); synchronised views share one frame rate")
    if path.endswith(".lmdb") or os.path.isdir(os.path.join(folder, path)):
      raise FeatureManifestError(f"{where}: '{path}' is not a .npy file; LMDB stores need converting first: "
                                 "`python -m egoexo_jax.input.assembly101` reads Assembly101's per-view stores")
    views.append(ViewFile(view, kind, os.path.join(folder, path), fps, where))
  if not recordings:
    raise FeatureManifestError(f"{manifest_path}: no rows")
  for recording, views in recordings.items():
    missing = [k for k in KINDS if not any(v.kind == k for v in views)]
    if missing:
      raise FeatureManifestError(f"{views[0].where}: recording '{recording}' has no {missing[0]} view; EVGAP "
                                 "aligns ego with exo views, so every recording needs both")
  return recordings


def load_views(views: Sequence[ViewFile], max_length_difference: int) -> np.ndarray:
  """The views' .npy arrays cut to a common length: (V, T, C) float32 or float16 (as stored)."""
  arrays = []
  for view in views:
    try:
      array = np.load(view.file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise FeatureManifestError(f"{view.where}: cannot read '{view.file}' as .npy ({e})") from e
    if array.ndim != 2 or array.dtype.kind != "f" or not array.shape[0]:
      raise FeatureManifestError(f"{view.where}: '{view.file}' holds {array.dtype} {array.shape}; expected a "
                                 "non-empty (frames, feature_dim) float array")
    if not np.isfinite(array).all():
      raise FeatureManifestError(f"{view.where}: '{view.file}' holds NaN or infinite values")
    arrays.append(array)
  dims = {a.shape[1] for a in arrays}
  if len(dims) > 1:
    raise FeatureManifestError(f"{views[0].where}: the views have feature sizes {sorted(dims)}; they must agree")
  lengths = [len(a) for a in arrays]
  if max(lengths) - min(lengths) > max_length_difference:
    longest, shortest = views[int(np.argmax(lengths))], views[int(np.argmin(lengths))]
    raise FeatureManifestError(
        f"'{longest.file}' ({max(lengths)} frames) and '{shortest.file}' ({min(lengths)} frames) differ by more "
        f"than {max_length_difference} frames (manifest {longest.where}, {shortest.where}); are they synchronised?")
  return np.stack([np.asarray(a[:min(lengths)]) for a in arrays])


# --------------------------------------------------------------------------- conversion


def convert_feature_manifest(manifest_path: str, output_prefix: str, *, num_shards: int = 1,
                             formats: Sequence[str] = ("tfrecord",), dtype: str = "float16", chunk_frames: int = 0,
                             max_length_difference: int = 2) -> dict:
  """Writes every recording of a view manifest into record shards and `<prefix>.json`; returns the index."""
  if max_length_difference < 0:
    raise ValueError(f"max_length_difference must be >= 0, got {max_length_difference}")
  recordings = read_view_manifest(manifest_path)

  def load():
    for recording_id, views in recordings.items():
      yield FeatureRecording(recording_id, [v.view for v in views], [v.kind for v in views],
                             load_views(views, max_length_difference), views[0].fps), views[0].where

  return write_feature_records(load(), output_prefix, num_shards=num_shards, formats=formats, dtype=dtype,
                               chunk_frames=chunk_frames, source=os.path.abspath(manifest_path))


def write_feature_records(recordings: Iterable[tuple[FeatureRecording, str]], output_prefix: str, *,
                          num_shards: int = 1, formats: Sequence[str] = ("tfrecord",), dtype: str = "float16",
                          chunk_frames: int = 0, source: str = "") -> dict:
  """Writes (recording with all its views, where it came from for errors) pairs into record shards and
  `<prefix>.json` (chunked by `chunk_frames` > 0, stored as `dtype`); returns the index. `source` names
  the input in the index ('manifest')."""
  from egoexo_jax.input import convert  # pylint: disable=g-import-not-at-top  (its ShardSet writes atomically)

  formats = tuple(formats)
  if not formats or set(formats) - set(FORMATS) or len(set(formats)) != len(formats):
    raise ValueError(f"formats must be distinct values among {FORMATS}, got {formats}")
  if dtype not in DTYPES or num_shards < 1 or chunk_frames < 0:
    raise ValueError(f"bad settings: dtype={dtype} (one of {DTYPES}), num_shards={num_shards}, "
                     f"chunk_frames={chunk_frames}")
  for fmt in formats:
    ours = set(convert.shard_paths(output_prefix, fmt, num_shards))
    stale = sorted(set(glob.glob(f"{glob.escape(output_prefix)}.{fmt}-*-of-*")) - ours)
    if stale:
      raise FileExistsError(f"{stale[0]} exists from a run with another shard count; remove it or use another prefix")
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  shard_sets, entries, feature_dims, shard_counts, recording_ids = [], [], set(), [0] * num_shards, set()
  try:
    shard_sets = [convert.ShardSet(output_prefix, fmt, num_shards) for fmt in formats]
    for whole, where in recordings:
      features = np.asarray(whole.features).astype(dtype)
      feature_dims.add(features.shape[2])
      if len(feature_dims) > 1:
        raise FeatureManifestError(f"{where}: feature size {features.shape[2]} differs from the "
                                   f"dataset's other recordings ({sorted(feature_dims)})")
      if whole.recording_id in recording_ids:
        raise FeatureManifestError(f"{where}: recording '{whole.recording_id}' is given twice")
      recording_ids.add(whole.recording_id)
      step = chunk_frames or features.shape[1]
      for first in range(0, features.shape[1], step):
        record = FeatureRecording(whole.recording_id, whole.view_names, whole.view_kinds,
                                  features[:, first:first + step], whole.fps, whole.first_frame + first)
        shard = len(entries) % num_shards
        data = encode_recording(record)
        for shard_set in shard_sets:
          shard_set.write(shard, data)
        entries.append({"recording": whole.recording_id, "first_frame": record.first_frame, "num_frames": record.num_frames,
                        "views": record.view_names, "kinds": record.view_kinds, "fps": record.fps,
                        "shard": shard, "position": shard_counts[shard]})
        shard_counts[shard] += 1
  except BaseException:
    for shard_set in shard_sets:
      shard_set.abort()
    raise
  if not entries:
    for shard_set in shard_sets:
      shard_set.abort()
    raise FeatureManifestError(f"{source or output_prefix}: no recordings to write")
  for shard_set in shard_sets:
    shard_set.commit()
  index = {"manifest": source, "feature_dim": feature_dims.pop(), "dtype": dtype,
           "formats": list(formats), "num_shards": num_shards, "chunk_frames": chunk_frames,
           "num_recordings": len(recording_ids), "num_records": len(entries), "records": entries}
  with atomic_files.atomic_write(f"{output_prefix}.json", "w") as f:
    json.dump(index, f, indent=1)
    f.write("\n")
  logging.info("%s: wrote %d records of %d recordings into %d shards per format", source or output_prefix,
               len(entries), len(recording_ids), num_shards)
  return index


# --------------------------------------------------------------------------- reading


class FeatureRecordSource:
  """Random access to the records of a conversion, in the index's order; items are FeatureRecordings.

  `prefix` is the converter's output prefix (its `<prefix>.json` lists the records); `fmt` picks the
  format when both were written. `entries` is the index: what the pipeline plans windows from.
  """

  def __init__(self, prefix: str, fmt: str | None = None):
    from egoexo_jax.input import convert  # pylint: disable=g-import-not-at-top

    index_path = f"{prefix}.json"
    if not os.path.exists(index_path):
      raise FileNotFoundError(f"no feature-record index '{index_path}': convert a view manifest with "
                              "egoexo_jax.input.feature_records first")
    with open(index_path) as f:
      index = json.load(f)
    self.fmt = fmt or index["formats"][0]
    if self.fmt not in index["formats"]:
      raise ValueError(f"{index_path}: format '{self.fmt}' was not written (formats: {index['formats']})")
    self.entries: list[dict] = index["records"]
    self.feature_dim: int = index["feature_dim"]
    self._paths = convert.shard_paths(prefix, self.fmt, index["num_shards"])
    self._where = [f"{self._paths[e['shard']]}#{e['position']}" for e in self.entries]
    self._locations = None  # per shard: (offset, length) of each record (TFRecord); opened lazily per process
    self._readers = {}

  def __len__(self) -> int:
    return len(self.entries)

  def _read(self, index: int) -> bytes:
    entry = self.entries[index]
    shard, position = entry["shard"], entry["position"]
    if self.fmt == "array_record":
      reader = self._readers.get(shard)
      if reader is None:
        import grain  # pylint: disable=g-import-not-at-top
        reader = self._readers[shard] = grain.sources.ArrayRecordDataSource([self._paths[shard]])
      return reader[position]
    if self._locations is None:
      self._locations = [list(records.scan_tfrecord(p)) for p in self._paths]
    fd = self._readers.get(shard)
    if fd is None:
      fd = self._readers[shard] = os.open(self._paths[shard], os.O_RDONLY)
    if position >= len(self._locations[shard]):
      raise records.RecordError(f"{self._where[index]}: the shard holds only {len(self._locations[shard])} records; "
                                "the index is stale")
    offset, length = self._locations[shard][position]
    return records.read_tfrecord_at(fd, offset, length, self._where[index])

  def __getitem__(self, index: int) -> FeatureRecording:
    recording = decode_recording(self._read(index), self._where[index])
    entry = self.entries[index]
    if (recording.recording_id, recording.first_frame, recording.num_frames) != (
        entry["recording"], entry["first_frame"], entry["num_frames"]):
      raise records.RecordError(f"{self._where[index]}: holds '{recording.recording_id}' from frame "
                                f"{recording.first_frame} ({recording.num_frames} frames) but the index says "
                                f"'{entry['recording']}' from {entry['first_frame']} ({entry['num_frames']}); "
                                "the index is stale")
    return recording

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = {}
    return state

  def __del__(self):
    for reader in getattr(self, "_readers", {}).values():
      if isinstance(reader, int):
        try:
          os.close(reader)
        except (OSError, TypeError, AttributeError):  # already closed, or the interpreter is shutting down
          pass

  def __repr__(self) -> str:
    return f"FeatureRecordSource({len(self._paths)} {self.fmt} shards, {len(self)} records)"


# --------------------------------------------------------------------------- command line


def _define_flags() -> None:
  flags.DEFINE_string("manifest", None, "View manifest CSV (recording,view,kind,path[,fps]).")
  flags.DEFINE_string("output_prefix", None, "Output files are <prefix>.<format>-0000i-of-0000N and <prefix>.json.")
  flags.DEFINE_integer("num_shards", 1, "Shards per format; record i goes to shard i % N.")
  flags.DEFINE_list("formats", ["tfrecord"], f"Output formats, among {FORMATS}.")
  flags.DEFINE_enum("dtype", "float16", DTYPES, "Stored feature dtype.")
  flags.DEFINE_integer("chunk_frames", 0, "Split recordings into records of at most this many frames (0: whole).")
  flags.DEFINE_integer("max_length_difference", 2, "Views of a recording may differ by this many frames.")
  flags.mark_flags_as_required(["manifest", "output_prefix"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  index = convert_feature_manifest(f.manifest, f.output_prefix, num_shards=f.num_shards, formats=f.formats,
                                   dtype=f.dtype, chunk_frames=f.chunk_frames,
                                   max_length_difference=f.max_length_difference)
  print(f"wrote {index['num_records']} records of {index['num_recordings']} recordings; index {f.output_prefix}.json")


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
