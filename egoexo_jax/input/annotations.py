r"""Official annotation files -> converter manifests (`egoexo_jax/input/convert.py`), one row per record.

    python -m egoexo_jax.input.annotations --dataset=epic100 --csv=EPIC_100_train.csv \
        --video_root=/data/EPIC-KITCHENS --output=/data/epic100/train_manifest.csv

Datasets and what a record is:
  charades_ego  `CharadesEgo_v1_{train,test}_only1st.csv` (columns used: id, actions; others ignored).
                One record per video, labels = every class id of its `actions` ("c092 11.90 21.20;c147
                0.00 12.60": class, start s, end s). The Ego-Exo / PySlowFast loader trains on a clip's
                own labels (the union of the per-frame labels inside the clip) and tests on the video's
                label set; so the intervals are also written to `<output stem>_intervals.json`
                ({video_id: [[class, start_s, end_s], ...]}), which the fine-tuning pipeline reads
                (`config.data.label_intervals`) to label each training clip. Videos without actions are
                skipped (the record format needs a label) and counted in the summary.
  epic55        `EPIC_train_action_labels.csv` (uid, participant_id, video_id, start/stop_timestamp,
                start/stop_frame, verb_class, noun_class, ...). One record per action segment,
                labels = [verb_class, num_verbs + noun_class], video_id = `<video_id>_<uid>`: per-head
                labels are stored as ids of the concatenated class space (verbs, then nouns), because
                the converter rejects a repeated id and a verb's id often equals its noun's
                ('turn box' is verb 23, noun 23 in EPIC-100). finetune_pipeline.record_labels undoes it.
  epic100       `EPIC_100_{train,validation}.csv` (narration_id, ...). As epic55, video_id = narration_id.
  kinetics      The official CSV (label, youtube_id, time_start, time_end, split) or PySlowFast's
                headerless "path label" lines. One record per (trimmed) video, labels = [class id];
                class ids are the line numbers of --classes (default: the sorted label names of this
                CSV, written to `<output stem>_classes.txt` for the other splits).

Videos: `--video_template` (formatted with the row's columns) names each file under --video_root.
A template holding a printf frame pattern (e.g. `{id}/{id}-%06d.jpg`, `{participant_id}/rgb_frames/
{video_id}/frame_%010d.jpg`) reads a folder of extracted frames instead: FFmpeg's image2 demuxer numbers
them at 25 frames/s from the first file, so EPIC segments come from start_frame/stop_frame (inclusive)
and Charades intervals are rescaled by --frame_rate (the rate the frames were extracted at) / 25.

Manifest paths are relative to the manifest's folder when --video_root is relative, absolute when it is.
Each output comes with `<output stem>.json`: dataset, label layout, class counts, records, skipped rows.
Malformed rows (a bad timestamp, an unknown class, a missing column) stop with an error naming file:line.
When none of the videos exists under --video_root (a wrong root or template), the command writes nothing
and exits 1, unless --allow_missing_videos (e.g. manifests made before the videos are downloaded).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import re
import sys
from typing import Sequence

from egoexo_jax import atomic_files
from egoexo_jax.input import csv_rows

IMAGE2_RATE = 25.0  # frames/s that FFmpeg's image2 demuxer gives a frame folder
DATASETS = ("charades_ego", "epic55", "epic100", "kinetics")
DEFAULT_TEMPLATES = {
    "charades_ego": "{id}.mp4",
    "epic55": "{participant_id}/{video_id}.MP4",
    "epic100": "{participant_id}/videos/{video_id}.MP4",
    "kinetics": "{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4",
}
NUM_CLASSES = {"charades_ego": {"action": 157}, "epic55": {"verb": 125, "noun": 352},
               "epic100": {"verb": 97, "noun": 300}}
_FRAME_PATTERN = re.compile(r"%0?\d*d")


class AnnotationError(ValueError):
  """A malformed annotation file or row; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One manifest row: a video or a segment of it, and its class ids."""

  path: str
  labels: tuple[int, ...]
  video_id: str
  start_sec: float | None = None
  end_sec: float | None = None


@dataclasses.dataclass
class Annotations:
  """What one annotation file turns into."""

  dataset: str
  records: list[Record]
  num_classes: dict[str, int]  # head name -> classes, in the order of `labels` (or one multi-label head)
  multi_label: bool
  skipped: list[str]  # 'file:line: reason'
  intervals: dict[str, list[list[float]]] | None = None  # charades_ego: video_id -> [class, start, end]
  class_names: list[str] | None = None  # kinetics


# --------------------------------------------------------------------------- fields


def parse_timestamp(text: str, where: str, column: str) -> float:
  """'HH:MM:SS.ff', 'MM:SS.ff' or plain seconds -> seconds."""
  text = (text or "").strip()
  parts = text.split(":")
  try:
    if not text or len(parts) > 3:
      raise ValueError
    values = [float(p) for p in parts]
    if any(not math.isfinite(v) or v < 0 for v in values) or any(v >= 60 for v in values[1:]):
      raise ValueError
  except ValueError:
    raise AnnotationError(f"{where}: column '{column}' is '{text}', not a timestamp HH:MM:SS.ff") from None
  seconds = 0.0
  for value in values:
    seconds = seconds * 60 + value
  return seconds


def parse_class(text: str, num_classes: int, where: str, column: str, prefix: str = "") -> int:
  """A class id ('12', or 'c012' with prefix 'c') in [0, num_classes)."""
  body = (text or "").strip()
  if prefix and body.startswith(prefix):
    body = body[len(prefix):]
  if not body.isdigit():
    raise AnnotationError(f"{where}: column '{column}' has class '{text}', not {prefix or ''}<integer>")
  value = int(body)
  if value >= num_classes:
    raise AnnotationError(f"{where}: column '{column}' has class {text}, outside the {num_classes} classes")
  return value


def _is_frame_pattern(template: str) -> bool:
  return bool(_FRAME_PATTERN.search(template))


def _video_path(template: str, fields: dict, where: str) -> str:
  try:
    return template.format(**fields)
  except (KeyError, ValueError, IndexError) as e:
    raise AnnotationError(f"{where}: --video_template '{template}' cannot be filled from this row ({e!r})") from None


# --------------------------------------------------------------------------- datasets


def read_charades_ego(csv_path: str, template: str, *, frame_rate: float | None = None,
                      num_classes: int = 157) -> Annotations:
  """One record per video with all its class ids; intervals for clip-level training labels."""
  frames = _is_frame_pattern(template)
  if frames and not frame_rate:
    raise AnnotationError(f"{csv_path}: --video_template '{template}' reads frame folders; give --frame_rate "
                          "(the rate the frames were extracted at, 24 for Charades-Ego) to place the intervals")
  time_scale = frame_rate / IMAGE2_RATE if frames else 1.0
  records, skipped, intervals = [], [], {}
  for _, where, row in csv_rows.read_csv_rows(csv_path, ("id", "actions"), AnnotationError):
    video_id = (row["id"] or "").strip()
    if not video_id:
      raise AnnotationError(f"{where}: column 'id' is empty")
    actions = []
    for item in filter(None, (a.strip() for a in (row["actions"] or "").split(";"))):
      parts = item.split()
      if len(parts) != 3:
        raise AnnotationError(f"{where}: column 'actions' has '{item}'; expected 'c<class> <start> <end>'")
      label = parse_class(parts[0], num_classes, where, "actions", prefix="c")
      try:
        start, end = float(parts[1]), float(parts[2])
      except ValueError:
        raise AnnotationError(f"{where}: column 'actions' has '{item}'; its times are not numbers") from None
      if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
        raise AnnotationError(f"{where}: column 'actions' has '{item}'; times must satisfy 0 <= start <= end")
      actions.append([label, start * time_scale, end * time_scale])
    if not actions:
      skipped.append(f"{where}: video '{video_id}' has no actions")
      continue
    if video_id in intervals:
      raise AnnotationError(f"{where}: video '{video_id}' is listed twice")
    intervals[video_id] = actions
    records.append(Record(_video_path(template, row, where), tuple(sorted({a[0] for a in actions})), video_id))
  return Annotations("charades_ego", records, {"action": num_classes}, True, skipped, intervals=intervals)


def read_epic(csv_path: str, template: str, *, version: int, num_verbs: int | None = None,
              num_nouns: int | None = None) -> Annotations:
  """EPIC-Kitchens-55 (version 55) or -100: one record per action segment, labels [verb, noun]."""
  dataset = f"epic{version}"
  sizes = dict(NUM_CLASSES[dataset])
  sizes["verb"], sizes["noun"] = num_verbs or sizes["verb"], num_nouns or sizes["noun"]
  id_column = "narration_id" if version == 100 else "uid"
  frames = _is_frame_pattern(template)
  time_columns = ("start_frame", "stop_frame") if frames else ("start_timestamp", "stop_timestamp")
  required = (id_column, "participant_id", "video_id", *time_columns, "verb_class", "noun_class")
  records = []
  for _, where, row in csv_rows.read_csv_rows(csv_path, required, AnnotationError):
    if frames:  # image2 gives frame f (1-based file numbers) the time (f - 1) / 25
      first, last = (_parse_frame(row[c], where, c) for c in time_columns)
      if last < first:
        raise AnnotationError(f"{where}: stop_frame {last} is before start_frame {first}")
      start, end = (first - 1) / IMAGE2_RATE, last / IMAGE2_RATE
    else:
      start, end = (parse_timestamp(row[c], where, c) for c in time_columns)
      if end <= start:
        raise AnnotationError(f"{where}: stop_timestamp {row[time_columns[1]]} is not after start_timestamp "
                              f"{row[time_columns[0]]}")
    labels = (parse_class(row["verb_class"], sizes["verb"], where, "verb_class"),
              sizes["verb"] + parse_class(row["noun_class"], sizes["noun"], where, "noun_class"))
    segment_id = row[id_column].strip() if version == 100 else f"{row['video_id'].strip()}_{row['uid'].strip()}"
    records.append(Record(_video_path(template, row, where), labels, segment_id, start, end))
  return Annotations(dataset, records, {"verb": sizes["verb"], "noun": sizes["noun"]}, False, [])


def _parse_frame(text: str, where: str, column: str) -> int:
  if not (text or "").strip().isdigit() or int(text) < 1:
    raise AnnotationError(f"{where}: column '{column}' is '{text}', not a frame number >= 1")
  return int(text)


def read_kinetics(csv_path: str, template: str, *, class_names: Sequence[str] | None = None) -> Annotations:
  """Kinetics CSV (label, youtube_id, time_start, time_end, split) or 'path label' lines: one record per video."""
  with open(csv_path, encoding="utf-8-sig") as f:
    first = f.readline()
  if "," not in first and len(first.split()) == 2:
    return _read_path_label_lines(csv_path)
  rows = []
  for _, where, row in csv_rows.read_csv_rows(csv_path, ("label", "youtube_id", "time_start", "time_end"),
                                              AnnotationError):
    fields = dict(row)
    for column in ("time_start", "time_end"):
      if not (row[column] or "").strip().isdigit():
        raise AnnotationError(f"{where}: column '{column}' is '{row[column]}', not whole seconds")
      fields[column] = int(row[column])
    if not (row["label"] or "").strip():
      raise AnnotationError(f"{where}: column 'label' is empty (test-split CSVs carry no labels)")
    rows.append((where, fields))
  names = list(class_names) if class_names else sorted({fields["label"].strip() for _, fields in rows})
  index = {name: i for i, name in enumerate(names)}
  records = []
  for where, fields in rows:
    label = fields["label"].strip()
    if label not in index:
      raise AnnotationError(f"{where}: label '{label}' is not in the class list ({len(names)} classes)")
    video_id = f"{fields['youtube_id'].strip()}_{fields['time_start']:06d}_{fields['time_end']:06d}"
    records.append(Record(_video_path(template, fields, where), (index[label],), video_id))
  return Annotations("kinetics", records, {"action": len(names)}, False, [], class_names=names)


def _read_path_label_lines(path: str) -> Annotations:
  """PySlowFast's 'path label' list (no header): paths relative to --video_root, integer labels."""
  records, seen = [], set()
  with open(path, encoding="utf-8-sig") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      parts = line.split()
      if len(parts) != 2 or not parts[1].isdigit():
        raise AnnotationError(f"{where}: expected 'path label' (an integer label), found '{line.strip()}'")
      video_id = os.path.splitext(parts[0])[0].replace(os.sep, "_")
      if video_id in seen:
        raise AnnotationError(f"{where}: '{parts[0]}' is listed twice")
      seen.add(video_id)
      records.append(Record(parts[0], (int(parts[1]),), video_id))
  if not records:
    raise AnnotationError(f"{path}: no data lines")
  num_classes = max(r.labels[0] for r in records) + 1
  return Annotations("kinetics", records, {"action": num_classes}, False, [])


def read_annotations(dataset: str, csv_path: str, *, video_template: str | None = None,
                     frame_rate: float | None = None, class_names: Sequence[str] | None = None,
                     num_classes: Sequence[int] | None = None) -> Annotations:
  """Reads an official annotation file of `dataset` (one of DATASETS) into Annotations."""
  template = video_template or DEFAULT_TEMPLATES.get(dataset)
  sizes = list(num_classes or [])
  if dataset == "charades_ego":
    result = read_charades_ego(csv_path, template, frame_rate=frame_rate, num_classes=(sizes or [157])[0])
  elif dataset in ("epic55", "epic100"):
    result = read_epic(csv_path, template, version=int(dataset[4:]), num_verbs=(sizes or [None])[0],
                       num_nouns=(sizes[1:] or [None])[0])
  elif dataset == "kinetics":
    result = read_kinetics(csv_path, template, class_names=class_names)
  else:
    raise ValueError(f"unknown dataset '{dataset}': use one of {DATASETS}")
  if not result.records:
    raise AnnotationError(f"{csv_path}: no usable rows ({len(result.skipped)} skipped)")
  return result


# --------------------------------------------------------------------------- output


def manifest_path(video_root: str, relative: str, manifest: str) -> str:
  """The manifest's `path` for a file under video_root (see the module docstring)."""
  full = os.path.join(video_root, relative)
  if os.path.isabs(video_root):
    return os.path.normpath(full)
  return os.path.relpath(full, os.path.dirname(os.path.abspath(manifest)))


def missing_videos(annotations: Annotations, video_root: str) -> tuple[int, list[str]]:
  """(how many record paths can be checked, those not found under video_root); frame folders are not checked."""
  checked = [r.path for r in annotations.records if not _is_frame_pattern(r.path)]
  return len(checked), [p for p in checked if not os.path.exists(os.path.join(video_root, p))]


def write_outputs(annotations: Annotations, source_csv: str, video_root: str, output: str) -> dict:
  """Writes the manifest CSV, its `<stem>.json` summary (returned) and, when present, the intervals
  (`<stem>_intervals.json`) and class names (`<stem>_classes.txt`)."""
  stem = os.path.splitext(output)[0]
  with atomic_files.atomic_write(output, "w") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["path", "labels", "video_id", "start_sec", "end_sec"])
    for record in annotations.records:
      writer.writerow([manifest_path(video_root, record.path, output), " ".join(map(str, record.labels)),
                       record.video_id, _seconds(record.start_sec), _seconds(record.end_sec)])
  counts, offsets, total = collections.Counter(), {}, 0
  for head, size in annotations.num_classes.items():  # per-head labels are concatenated-space ids
    offsets[head], total = total, total + size
  for record in annotations.records:
    pairs = ((("action", label) for label in record.labels) if annotations.multi_label
             else zip(annotations.num_classes, record.labels))
    for head, label in pairs:
      counts[(head, label - offsets[head])] += 1
  _, missing = missing_videos(annotations, video_root)
  summary = {
      "dataset": annotations.dataset, "source": source_csv, "manifest": output,
      "video_root": video_root, "num_records": len(annotations.records),
      "label_layout": {"multi_label": annotations.multi_label, "heads": list(annotations.num_classes),
                       "num_classes": annotations.num_classes, "label_offsets": offsets},
      "records_per_class": {head: {str(k): n for (h, k), n in sorted(counts.items()) if h == head}
                            for head in annotations.num_classes},
      "skipped": annotations.skipped, "videos_not_found": len(missing), "first_not_found": missing[:5],
  }
  if annotations.intervals is not None:
    summary["intervals"] = stem + "_intervals.json"
    with atomic_files.atomic_write(summary["intervals"], "w") as f:
      json.dump(annotations.intervals, f)
  if annotations.class_names is not None:
    summary["classes"] = stem + "_classes.txt"
    with atomic_files.atomic_write(summary["classes"], "w") as f:
      f.write("".join(name + "\n" for name in annotations.class_names))
  with atomic_files.atomic_write(stem + ".json", "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
  return summary


def _seconds(value: float | None) -> str:
  return "" if value is None else f"{value:.6g}"


# --------------------------------------------------------------------------- command line


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_enum("dataset", None, DATASETS, "Which annotation format --csv is in.")
  flags.DEFINE_string("csv", None, "The official annotation file.")
  flags.DEFINE_string("video_root", None, "Folder the video files (or frame folders) are under.")
  flags.DEFINE_string("output", None, "The manifest CSV to write (summary: <stem>.json beside it).")
  flags.DEFINE_string("video_template", None, f"Video path under --video_root per row; defaults {DEFAULT_TEMPLATES}.")
  flags.DEFINE_float("frame_rate", None, "Frame-folder input: the rate the frames were extracted at (Charades).")
  flags.DEFINE_string("classes", None, "Kinetics: class names, one per line (line number = class id).")
  flags.DEFINE_list("num_classes", None, "Override the class counts (Charades: 157; EPIC: verbs,nouns).")
  flags.DEFINE_bool("allow_missing_videos", False, "Write the manifest even when none of its videos exist yet.")
  flags.mark_flags_as_required(["dataset", "csv", "video_root", "output"])


def main(argv: Sequence[str]) -> None:
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  class_names = None
  if f.classes:
    with open(f.classes, encoding="utf-8") as fh:
      class_names = [line.strip() for line in fh if line.strip()]
  annotations = read_annotations(f.dataset, f.csv, video_template=f.video_template, frame_rate=f.frame_rate,
                                 class_names=class_names, num_classes=[int(n) for n in f.num_classes or []])
  checked, missing = missing_videos(annotations, f.video_root)
  if checked and len(missing) == checked and not f.allow_missing_videos:
    sys.exit(f"error: none of the {checked} videos of {f.csv} exists under --video_root={f.video_root} (e.g. "
             f"{os.path.join(f.video_root, missing[0])}); check --video_root and --video_template, or pass "
             "--allow_missing_videos to write the manifest anyway. Nothing was written.")
  summary = write_outputs(annotations, f.csv, f.video_root, f.output)
  for reason in annotations.skipped:
    logging.warning("skipped %s", reason)
  if summary["videos_not_found"]:
    logging.warning("%d videos are not under %s, e.g. %s", summary["videos_not_found"], f.video_root,
                    summary["first_not_found"][0])
  print(f"wrote {summary['num_records']} records ({len(annotations.skipped)} rows skipped, "
        f"{summary['videos_not_found']} videos not found) to {f.output}; summary {os.path.splitext(f.output)[0]}.json")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top

  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
