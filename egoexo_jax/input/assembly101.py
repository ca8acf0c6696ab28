"""Assembly101's released files -> this project's inputs: TSM feature LMDBs -> feature records, annotation
CSVs -> the downstream segments and split CSVs (downstream/annotations.py).

    python -m egoexo_jax.input.assembly101 --lmdb_root=/data/a101/TSM_features \
        --output_prefix=/data/a101/records/train --num_shards=64 --chunk_frames=1000
    python -m egoexo_jax.input.assembly101 --fine_csvs=train.csv,validation.csv --segments_out=fine.csv \
        --split_out=fine_split.csv
    python -m egoexo_jax.input.assembly101 --coarse_labels=coarse_labels --coarse_actions=actions.csv \
        --coarse_splits=coarse_splits --segments_out=coarse.csv --split_out=coarse_split.csv

TSM features (the layout Assembly101's own loaders read: assembly101-temporal-action-segmentation
dataset.py, assembly101-action-anticipation tempAgg dataset.py): `<lmdb_root>/<view>/` is one LMDB
environment per camera view, holding every sequence seen by that view under the keys

    '{sequence}/{view}/{view}_{frame:010d}.jpg'  ->  2048 float32 values (8192 bytes, native order)

one per video frame at 30 fps. Frame numbers start at 1 (the `_0000000001.jpg` key of Assembly101's
read_lmdb helper; the anticipation loader reads annotation frame x at key x + 1), so annotation frame t
(0-based) is key t + `first_key_frame`. A recording's record holds every view that has the sequence,
over the frames all of them have (a view shorter by more than `max_length_difference` frames is an
error naming it); a frame missing inside a view's range repeats the frame before it (counted in the log).

Views: 'ego' for the four head-mounted monochrome cameras ('HMC_<serial>_mono10bit'), 'exo' for the
eight fixed RGB cameras ('C<serial>_rgb'); `view_kind` decides, any other name is an error.

Annotations (assembly101-annotations READMEs). Fine-grained (used for recognition and anticipation):
CSVs with columns id, video ('{sequence}/{view}.mp4'), start_frame, end_frame, action_id, verb_id,
noun_id, ...; each segment is listed once per view, kept once per sequence here. Coarse (segmentation):
`coarse_labels/{assembly|disassembly}_{sequence}.txt`, tab-separated 'start end action_cls' lines,
class names mapped to ids by the coarse actions.csv (action_id, verb_id, noun_id, action_cls, ...);
splits in `coarse_splits/{train|val|test}_coarse_{assembly|disassembly}.txt` (first column the labels
file name). Frames are at 30 fps, end exclusive (as the segmentation loader counts end - start frames).
Output: `recording,start_frame,end_frame,action,verb,object` and `recording,split`, recording = sequence.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Iterator, Sequence

import lmdb
import numpy as np
from absl import app, flags, logging

from egoexo_jax import atomic_files
from egoexo_jax.downstream.annotations import Segment  # the segment file this converter writes, downstream reads
from egoexo_jax.input import csv_rows, feature_records

TSM_FEATURE_DIM = 2048
FIRST_KEY_FRAME = 1
FPS = 30.0
FINE_COLUMNS = ("video", "start_frame", "end_frame", "action_id", "verb_id", "noun_id")
FINE_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
COARSE_TASK = re.compile(r"^(assembly|disassembly|disassebly)_(.+?)(\.txt)?$")  # 'disassebly': a spelling in the release


class Assembly101Error(ValueError):
  """An Assembly101 file that cannot be used; the message names the file, key or line."""


def view_kind(view: str) -> str:
  if view.startswith("HMC_"):
    return "ego"
  if view.endswith("_rgb"):
    return "exo"
  raise Assembly101Error(f"view '{view}' is neither a head-mounted camera ('HMC_...', ego) nor a fixed one "
                         "('..._rgb', exo)")


def lmdb_key(sequence: str, view: str, frame: int) -> bytes:
  return f"{sequence}/{view}/{view}_{frame:010d}.jpg".encode()


# --------------------------------------------------------------------------- LMDB feature stores


class ViewStore:
  """One view's LMDB environment, read-only."""

  def __init__(self, path: str, feature_dim: int = TSM_FEATURE_DIM):
    if not os.path.isfile(os.path.join(path, "data.mdb")):
      raise Assembly101Error(f"'{path}' is not an LMDB environment (no data.mdb)")
    self.path, self.view, self.feature_dim = path, os.path.basename(os.path.normpath(path)), feature_dim
    self._env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=64)

  def sequences(self) -> list[str]:
    """The sequences this view holds, sorted (one seek per sequence, not a scan of every key)."""
    found = []
    with self._env.begin() as txn:
      cursor = txn.cursor()
      present = cursor.first()
      while present:
        key = cursor.key().decode()
        sequence = key.split("/", 1)[0]
        if "/" not in key:
          raise Assembly101Error(f"{self.path}: key '{key}' is not '<sequence>/<view>/<view>_<frame>.jpg'")
        found.append(sequence)
        present = cursor.set_range((sequence + "0").encode())  # '0' sorts right after '/': the next sequence
    return found

  def frames(self, sequence: str) -> tuple[int, np.ndarray, int]:
    """(first frame number, (T, C) float32 features of frames first .. first + T - 1, frames filled in gaps)."""
    prefix = f"{sequence}/{self.view}/{self.view}_".encode()
    numbers, values = [], []
    with self._env.begin() as txn:
      cursor = txn.cursor()
      present = cursor.set_range(prefix)
      while present and cursor.key().startswith(prefix):
        key = cursor.key().decode()
        number = key[len(prefix):]
        if not number.endswith(".jpg") or not number[:-4].isdigit():
          raise Assembly101Error(f"{self.path}: key '{key}' does not end in '_<frame:010d>.jpg'")
        value = cursor.value()
        if len(value) != 4 * self.feature_dim:
          raise Assembly101Error(f"{self.path}: key '{key}' holds {len(value)} bytes, not {self.feature_dim} "
                                 f"float32 ({4 * self.feature_dim} bytes)")
        numbers.append(int(number[:-4]))
        values.append(np.frombuffer(value, np.float32))
        present = cursor.next()
    if not numbers:
      raise Assembly101Error(f"{self.path}: no key starts with '{prefix.decode()}'")
    first, last = numbers[0], numbers[-1]  # sorted: zero-padded numbers sort as integers
    features = np.empty((last - first + 1, self.feature_dim), np.float32)
    features[np.asarray(numbers) - first] = np.stack(values)
    present = np.zeros(last - first + 1, bool)
    present[np.asarray(numbers) - first] = True
    filled = int((~present).sum())
    for t in np.flatnonzero(~present):  # a missing frame repeats the one before it (frame `first` is present)
      features[t] = features[t - 1]
    if not np.isfinite(features).all():
      raise Assembly101Error(f"{self.path}: sequence '{sequence}' holds NaN or infinite features")
    return first, features, filled


def open_views(lmdb_root: str, views: Sequence[str] = (), feature_dim: int = TSM_FEATURE_DIM) -> list[ViewStore]:
  """The view stores under `lmdb_root` (every sub-folder with a data.mdb, or those named in `views`)."""
  names = list(views) or sorted(d for d in os.listdir(lmdb_root) if os.path.isfile(os.path.join(lmdb_root, d, "data.mdb")))
  if not names:
    raise Assembly101Error(f"'{lmdb_root}' holds no LMDB view folder (<view>/data.mdb)")
  for name in names:
    view_kind(name)
  return [ViewStore(os.path.join(lmdb_root, name), feature_dim) for name in names]


def read_recording(stores: Sequence[ViewStore], sequence: str, *, first_key_frame: int = FIRST_KEY_FRAME,
                   max_length_difference: int = 2, fps: float = FPS) -> feature_records.FeatureRecording:
  """All given views of one sequence over their common frames; record frame 0 is annotation frame
  `first_frame` (= first common key number - first_key_frame)."""
  read = [(store, *store.frames(sequence)) for store in stores]
  starts = [first for _, first, _, _ in read]
  ends = [first + len(features) for _, first, features, _ in read]
  start, end = max(starts), min(ends)
  if start < first_key_frame:
    raise Assembly101Error(f"{read[int(np.argmin(starts))][0].path}: sequence '{sequence}' has frame {min(starts)}, "
                           f"before the first key frame {first_key_frame}")
  for (store, first, features, _), s, e in zip(read, starts, ends):
    if (start - s) + (e - end) > max_length_difference:
      raise Assembly101Error(f"{store.path}: sequence '{sequence}' has frames {s}..{e - 1}, but the views' common "
                             f"frames are {start}..{end - 1}: more than {max_length_difference} frames differ; "
                             "are the views synchronised? (--max_length_difference)")
  filled = sum(f for *_, f in read)
  if filled:
    logging.warning("%s: %d missing frames filled with the frame before", sequence, filled)
  kinds = [view_kind(store.view) for store in stores]
  if set(kinds) != {"ego", "exo"}:
    raise Assembly101Error(f"sequence '{sequence}': views {[s.view for s in stores]} are not both ego and exo; "
                           "EVGAP aligns ego with exo views")
  features = np.stack([features[start - first:end - first] for _, first, features, _ in read])
  return feature_records.FeatureRecording(sequence, [s.view for s in stores], kinds, features, fps,
                                          first_frame=start - first_key_frame)


def recordings(lmdb_root: str, *, views: Sequence[str] = (), sequences: Sequence[str] = (),
               **kwargs) -> Iterator[tuple[feature_records.FeatureRecording, str]]:
  """(recording, where) for each sequence (all those with ego and exo views, or those named), views that
  hold it only."""
  stores = open_views(lmdb_root, views)
  holding: dict[str, list[ViewStore]] = {}
  for store in stores:
    for sequence in store.sequences():
      holding.setdefault(sequence, []).append(store)
  for sequence in sequences:
    if sequence not in holding:
      raise Assembly101Error(f"'{lmdb_root}': no view holds sequence '{sequence}'")
  for sequence in (list(sequences) or sorted(holding)):
    here = holding[sequence]
    if not sequences and {view_kind(s.view) for s in here} != {"ego", "exo"}:
      logging.warning("%s: only %s views; skipped", sequence, sorted({view_kind(s.view) for s in here}))
      continue
    yield read_recording(here, sequence, **kwargs), f"{lmdb_root} ({sequence})"


def convert_lmdb_features(lmdb_root: str, output_prefix: str, *, views: Sequence[str] = (),
                          sequences: Sequence[str] = (), npy_dir: str = "", num_shards: int = 1,
                          formats: Sequence[str] = ("tfrecord",), dtype: str = "float16", chunk_frames: int = 0,
                          **kwargs) -> dict:
  """Writes feature records (feature_records.write_feature_records) of every sequence; with `npy_dir`, also
  `<npy_dir>/<sequence>/<view>.npy` (float32 (T, C), the downstream feature folders)."""

  def with_npy():
    for recording, where in recordings(lmdb_root, views=views, sequences=sequences, **kwargs):
      if npy_dir:
        for view, features in zip(recording.view_names, recording.features):
          with atomic_files.atomic_write(os.path.join(npy_dir, recording.recording_id, f"{view}.npy")) as f:
            np.save(f, features)
      yield recording, where

  return feature_records.write_feature_records(with_npy(), output_prefix, num_shards=num_shards, formats=formats,
                                               dtype=dtype, chunk_frames=chunk_frames,
                                               source=os.path.abspath(lmdb_root))


# --------------------------------------------------------------------------- annotations


def _int(text: str, column: str, where: str) -> int:
  try:
    return int(str(text).strip())
  except ValueError as e:
    raise Assembly101Error(f"{where}: column '{column}' is '{text}', not an integer") from e


def read_fine_grained(paths: Sequence[str]) -> tuple[dict[str, list[Segment]], dict[str, str]]:
  """Fine-grained CSVs -> ({sequence: its segments, once each, sorted}, {sequence: split from the file name})."""
  segments: dict[str, set[Segment]] = {}
  splits: dict[str, str] = {}
  for path in paths:
    split = FINE_SPLITS.get(os.path.splitext(os.path.basename(path))[0].split("_")[0])
    for _, where, fields in csv_rows.read_csv_rows(path, FINE_COLUMNS, Assembly101Error):
      video = fields["video"].strip()
      if video.count("/") != 1 or not video.endswith(".mp4"):
        raise Assembly101Error(f"{where}: column 'video' is '{video}', not '<sequence>/<view>.mp4'")
      sequence = video.split("/")[0]
      start, end, action, verb, noun = (_int(fields[c], c, where) for c in FINE_COLUMNS[1:])
      if not 0 <= start < end or min(action, verb, noun) < 0:
        raise Assembly101Error(f"{where}: need 0 <= start_frame < end_frame and non-negative class ids")
      segments.setdefault(sequence, set()).add(Segment(start, end, action, verb, noun))
      if split:
        if splits.setdefault(sequence, split) != split:
          raise Assembly101Error(f"{where}: sequence '{sequence}' is in split '{split}' and '{splits[sequence]}'")
  return {k: sorted(v) for k, v in segments.items()}, splits


def read_coarse_actions(path: str) -> dict[str, tuple[int, int, int]]:
  """{action_cls: (action_id, verb_id, noun_id)} of the coarse actions.csv."""
  actions = {}
  for _, where, fields in csv_rows.read_csv_rows(path, ("action_id", "verb_id", "noun_id", "action_cls"),
                                                 Assembly101Error):
    actions[fields["action_cls"].strip()] = tuple(_int(fields[c], c, where) for c in ("action_id", "verb_id", "noun_id"))
  return actions


def coarse_sequence(file_name: str, where: str) -> str:
  match = COARSE_TASK.match(os.path.basename(file_name.strip()))
  if not match:
    raise Assembly101Error(f"{where}: '{file_name}' is not '{{assembly|disassembly}}_<sequence>.txt'")
  return match.group(2)


def read_coarse_labels(folder: str, actions: dict[str, tuple[int, int, int]]) -> dict[str, list[Segment]]:
  """{sequence: segments} from every `{assembly|disassembly}_<sequence>.txt` of `folder` (both tasks of a
  sequence together: they cover different frames)."""
  segments: dict[str, list[Segment]] = {}
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".txt"):
      continue
    path = os.path.join(folder, name)
    sequence = coarse_sequence(name, path)
    with open(path) as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{line_number}"
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
          raise Assembly101Error(f"{where}: expected 'start<TAB>end<TAB>action_cls', got '{line.strip()}'")
        start, end = _int(parts[0], "start", where), _int(parts[1], "end", where)
        name_cls = parts[2].strip()
        if name_cls not in actions:
          raise Assembly101Error(f"{where}: action '{name_cls}' is not in the coarse actions.csv")
        if not 0 <= start < end:
          raise Assembly101Error(f"{where}: need 0 <= start < end, got {start}, {end}")
        segments.setdefault(sequence, []).append(Segment(start, end, *actions[name_cls]))
  if not segments:
    raise Assembly101Error(f"'{folder}' holds no coarse label file")
  return {k: sorted(v) for k, v in segments.items()}


def read_coarse_splits(folder: str) -> dict[str, str]:
  """{sequence: split} from `{train|val|test}_coarse_{assembly|disassembly}.txt`."""
  splits: dict[str, str] = {}
  for name in sorted(os.listdir(folder)):
    split = name.split("_")[0]
    if not name.endswith(".txt") or split not in ("train", "val", "test"):
      continue
    path = os.path.join(folder, name)
    with open(path) as f:
      for line_number, line in enumerate(f, 1):
        if line.strip():
          sequence = coarse_sequence(line.split("\t")[0], f"{path}:{line_number}")
          if splits.setdefault(sequence, split) != split:
            raise Assembly101Error(f"{path}:{line_number}: sequence '{sequence}' is in '{split}' and '{splits[sequence]}'")
  return splits


def write_segments(path: str, segments: dict[str, list[Segment]]) -> None:
  with atomic_files.atomic_write(path, "w") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["recording", "start_frame", "end_frame", "action", "verb", "object"])
    for sequence in sorted(segments):
      for s in segments[sequence]:
        writer.writerow([sequence, s.start, s.end, s.action, s.verb, s.object])


def write_split(path: str, splits: dict[str, str]) -> None:
  with atomic_files.atomic_write(path, "w") as f:
    f.write("recording,split\n")
    f.writelines(f"{sequence},{splits[sequence]}\n" for sequence in sorted(splits))


# --------------------------------------------------------------------------- command line


def _define_flags() -> None:
  flags.DEFINE_string("lmdb_root", None, "Folder of per-view LMDB TSM feature stores (<view>/data.mdb).")
  flags.DEFINE_string("output_prefix", None, "Feature records: <prefix>.<format>-0000i-of-0000N and <prefix>.json.")
  flags.DEFINE_list("views", [], "Views to read (default: every view folder).")
  flags.DEFINE_list("sequences", [], "Sequences to convert (default: every one with ego and exo views).")
  flags.DEFINE_string("npy_dir", "", "Also write <npy_dir>/<sequence>/<view>.npy (downstream feature folders).")
  flags.DEFINE_integer("num_shards", 1, "Shards per format.")
  flags.DEFINE_list("formats", ["tfrecord"], "Record formats (tfrecord, array_record).")
  flags.DEFINE_enum("dtype", "float16", feature_records.DTYPES, "Stored feature dtype.")
  flags.DEFINE_integer("chunk_frames", 0, "Split recordings into records of at most this many frames (0: whole).")
  flags.DEFINE_integer("max_length_difference", 2, "Views of a sequence may cover this many frames more or less.")
  flags.DEFINE_integer("first_key_frame", FIRST_KEY_FRAME, "Key frame number of annotation frame 0.")
  flags.DEFINE_list("fine_csvs", [], "Fine-grained train/validation CSVs (segments and splits).")
  flags.DEFINE_string("coarse_labels", "", "The coarse_labels folder.")
  flags.DEFINE_string("coarse_actions", "", "The coarse actions.csv.")
  flags.DEFINE_string("coarse_splits", "", "The coarse_splits folder.")
  flags.DEFINE_string("segments_out", "", "Output segments CSV (recording,start_frame,end_frame,action,verb,object).")
  flags.DEFINE_string("split_out", "", "Output split CSV (recording,split).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if bool(f.lmdb_root) != bool(f.output_prefix):
    raise app.UsageError("--lmdb_root and --output_prefix go together")
  if f.lmdb_root:
    index = convert_lmdb_features(f.lmdb_root, f.output_prefix, views=f.views, sequences=f.sequences,
                                  npy_dir=f.npy_dir, num_shards=f.num_shards, formats=f.formats, dtype=f.dtype,
                                  chunk_frames=f.chunk_frames, max_length_difference=f.max_length_difference,
                                  first_key_frame=f.first_key_frame)
    print(f"wrote {index['num_records']} records of {index['num_recordings']} sequences; index {f.output_prefix}.json")
  if f.fine_csvs or f.coarse_labels:
    if not f.segments_out or (f.fine_csvs and f.coarse_labels):
      raise app.UsageError("give --segments_out and either --fine_csvs or --coarse_labels (with --coarse_actions)")
    if f.fine_csvs:
      segments, splits = read_fine_grained(f.fine_csvs)
    else:
      segments = read_coarse_labels(f.coarse_labels, read_coarse_actions(f.coarse_actions))
      splits = read_coarse_splits(f.coarse_splits) if f.coarse_splits else {}
    write_segments(f.segments_out, segments)
    if f.split_out:
      write_split(f.split_out, splits)
    print(f"wrote {sum(map(len, segments.values()))} segments of {len(segments)} sequences to {f.segments_out}")


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
