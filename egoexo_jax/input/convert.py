"""Videos listed in a CSV manifest -> sharded TFRecord / ArrayRecord files of `records.VideoRecord`s.

About 90 of this module's lines are this docstring (the manifest format and the conversion rules); the work
itself is in manifest.py, teacher_files.py, convert_video.py and shards.py.

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
  * `fps` > 0 stores at most that many frames per second: a faster stream keeps the first frame at or
    after each 1/fps step (frames are dropped, never duplicated) and its records say `fps`; a stream
    within 1% of it (29.97 at 30) or slower keeps every frame and its own rate. Default 0: every frame.
  * Shards are written one at a time and survive an interruption: a rerun with the same inputs and
    settings keeps the shards an interrupted run completed and converts the rest (shards.py).
  * JPEG frames are baseline, 4:2:0 chroma, not optimised (Pillow's defaults): what the decoders of
    the input pipeline read fastest. The summary gives bytes per second of video and the ratio to the
    source files' bytes (README, "Storage").

Modules: manifest.py (rows), teacher_files.py (pickles, detections), convert_video.py (one row -> one
record), shards.py (files, resume, summary), convert_beam.py (the same shards from an Apache Beam
pipeline). The names other code imports from here stay importable from here.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
from typing import Iterator, Sequence

from absl import app
from absl import flags
from absl import logging

from egoexo_jax.input import conversion_progress, records, shards
# Re-exported: pipelines, evaluate, pseudo_labels, feature_records and tests import these from here.
from egoexo_jax.input.convert_video import (  # pylint: disable=unused-import
    RATE_MISMATCH, SEEK_MARGIN_SEC, TRUNCATION_TOLERANCE_SEC, DecodedSegment, RowResult, RowTask, VideoError,
    convert_row, decode_segment, stored_size)
from egoexo_jax.input.manifest import ManifestError, ManifestRow, read_manifest  # pylint: disable=unused-import
from egoexo_jax.input.shards import FORMATS, ShardSet, shard_paths  # pylint: disable=unused-import
from egoexo_jax.input.teacher_files import (  # pylint: disable=unused-import
    NPY_LENGTH_TOLERANCE, PseudoLabelError, convert_detections, find_detections, hand_object_npy_path,
    load_logit_files, load_logits)
from egoexo_jax.input import teacher_files

DEFAULT_JPEG_QUALITY = 75  # README "Storage": 2.5x the source bytes at short side 256 on 30 fps clips
DEFAULT_SHORT_SIDE = 256


class ConversionError(RuntimeError):
  """Raised in strict mode for the first video that cannot be converted; names the file."""


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did."""

  written: int
  skipped: list[tuple[str, str]]  # (video path as in the manifest, reason)
  without_boxes: list[str]  # manifest paths with no detector file although hand_object_dir was given
  missing_pseudo_labels: dict[str, list[str]]  # field -> manifest paths left without it (allow_missing)
  output_files: list[str]
  summary_file: str
  storage: dict = dataclasses.field(default_factory=dict)  # shards.Stats.storage
  reused_shards: int = 0  # shards an interrupted earlier run had completed

  def summary_line(self) -> str:
    return (f"wrote {self.written} records, skipped {len(self.skipped)} videos, "
            f"{len(self.without_boxes)} videos without boxes, into {len(self.output_files)} files")

  def storage_line(self) -> str:
    """Bytes per second of stored video, per format, and the ratio to the source files' bytes."""
    if not self.storage.get("seconds_of_video"):
      return "stored no video"
    parts = []
    for fmt, per_second in self.storage["bytes_per_second"].items():
      ratio = self.storage["ratio_to_source"][fmt]
      parts.append(f"{fmt} {per_second / 1e3:.1f} kB per second of video "
                   f"({per_second * 3600 / 1e9:.2f} GB per hour, {ratio:.2f}x the source's bytes)"
                   if ratio is not None else f"{fmt} {per_second / 1e3:.1f} kB per second of video")
    return f"stored {self.storage['seconds_of_video']:.1f} s of video: " + "; ".join(parts)


@dataclasses.dataclass
class Plan:
  """A manifest's rows turned into per-row tasks, with what the teacher files lack."""

  rows: list[ManifestRow]
  tasks: list[RowTask]
  without_boxes: list[str]
  missing_pseudo_labels: dict[str, list[str]]


def plan_conversion(manifest_path: str, *, short_side: int = DEFAULT_SHORT_SIDE,
                    jpeg_quality: int = DEFAULT_JPEG_QUALITY, fps: float = 0.0, ego_logits: str | None = None,
                    object_logits: str | None = None, hand_object_dir: str | None = None,
                    allow_missing_pseudo_labels: bool = False, box_score_threshold: float = 0.5,
                    repair_boxes: bool = False) -> Plan:
  """Reads the manifest and teacher files (their errors are fatal) into one RowTask per row."""
  if short_side < 1 or not 1 <= jpeg_quality <= 100 or not fps >= 0:
    raise ValueError(f"bad settings: short_side={short_side}, jpeg_quality={jpeg_quality} (1..100), fps={fps} (>= 0)")
  rows = read_manifest(manifest_path)
  ego_table = None if ego_logits is None else load_logit_files(ego_logits, "ego_logits", length=2)
  object_table = None if object_logits is None else load_logit_files(object_logits, "object_logits")
  ego_vectors, ego_missing = teacher_files.teacher_vectors(rows, ego_table, ego_logits, "ego_logits",
                                                           allow_missing_pseudo_labels)
  object_vectors, object_missing = teacher_files.teacher_vectors(rows, object_table, object_logits,
                                                                 "object_logits", allow_missing_pseudo_labels)
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
                   box_score_threshold, repair_boxes, float(fps))
           for i, row in enumerate(rows)]
  return Plan(rows, tasks, without_boxes, {"ego_logits": ego_missing, "object_logits": object_missing})


def _results(tasks: list[RowTask], workers: int, pool_holder: list) -> Iterator[RowResult]:
  if workers > 1 and len(tasks) > 1:
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
    pool_holder.append(pool)
    return pool.imap(convert_row, tasks, chunksize=1)  # in task order: deterministic output
  return map(convert_row, tasks)


@dataclasses.dataclass
class Run:
  """A conversion about to write: the plan, each shard's tasks and fingerprint, shards already complete."""

  manifest_path: str
  output_prefix: str
  num_shards: int
  formats: tuple[str, ...]
  settings: dict  # for the summary JSON
  plan: Plan
  shard_tasks: list[list[RowTask]]
  fingerprints: list[str]
  done: dict[int, dict]  # shard -> done marker of an earlier run

  @property
  def pending(self) -> list[RowTask]:
    return [task for s in range(self.num_shards) if s not in self.done for task in self.shard_tasks[s]]


def prepare(manifest_path: str, output_prefix: str, *, short_side: int = DEFAULT_SHORT_SIDE,
            jpeg_quality: int = DEFAULT_JPEG_QUALITY, fps: float = 0.0, num_shards: int = 1,
            formats: Sequence[str] = ("tfrecord",), ego_logits: str | None = None,
            object_logits: str | None = None, hand_object_dir: str | None = None,
            allow_missing_pseudo_labels: bool = False, box_score_threshold: float = 0.5,
            repair_boxes: bool = False, min_fraction_written: float = 0.5) -> Run:
  """Checks the settings, reads manifest and teacher files, finds the shards an earlier run completed."""
  if not 0.0 <= min_fraction_written <= 1.0:
    raise ValueError(f"min_fraction_written is {min_fraction_written}; it must be in [0, 1]")
  formats = tuple(formats)
  if not formats or any(fmt not in FORMATS for fmt in formats) or len(set(formats)) != len(formats):
    raise ValueError(f"formats must be distinct values among {FORMATS}, got {formats}")
  if num_shards < 1:
    raise ValueError(f"bad settings: num_shards={num_shards}")
  plan = plan_conversion(
      manifest_path, short_side=short_side, jpeg_quality=jpeg_quality, fps=fps, ego_logits=ego_logits,
      object_logits=object_logits, hand_object_dir=hand_object_dir,
      allow_missing_pseudo_labels=allow_missing_pseudo_labels, box_score_threshold=box_score_threshold,
      repair_boxes=repair_boxes)
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  shards.check_no_stale_shards(output_prefix, formats, num_shards)
  shards.remove_stale_partials(output_prefix)
  shard_tasks = [plan.tasks[s::num_shards] for s in range(num_shards)]
  prints = [shards.fingerprint(tasks, formats) for tasks in shard_tasks]
  done = {s: shards.completed_shard(output_prefix, s, num_shards, formats, prints[s]) for s in range(num_shards)}
  settings = dict(
      manifest=os.path.abspath(manifest_path), formats=list(formats), num_shards=num_shards,
      short_side=short_side, jpeg_quality=jpeg_quality, max_fps=fps, min_fraction_written=min_fraction_written,
      teacher_files={"ego_logits": ego_logits, "object_logits": object_logits, "hand_object_dir": hand_object_dir})
  return Run(manifest_path, output_prefix, num_shards, formats, settings, plan, shard_tasks, prints,
             {s: marker for s, marker in done.items() if marker is not None})


def finish(run: Run, markers: dict[int, dict]) -> ConversionReport:
  """From every shard's done marker: checks enough was written (else discards all and raises
  ConversionError), renames the shards into place, writes the summary JSON, removes the markers."""
  stats, skipped = shards.Stats(), []
  for s in range(run.num_shards):
    stats.entries.extend(markers[s]["entries"])
    skipped.extend(tuple(x) for x in markers[s]["skipped"])
  try:
    _check_written(run.manifest_path, stats.written, len(run.plan.rows), skipped,
                   run.settings["min_fraction_written"])
  except ConversionError:
    shards.discard(run.output_prefix, run.num_shards, run.formats)
    raise
  output_files = shards.publish(run.output_prefix, run.num_shards, run.formats)
  storage = stats.storage({fmt: sum(os.path.getsize(p) for p in shard_paths(run.output_prefix, fmt, run.num_shards))
                           for fmt in run.formats})
  summary_file = f"{run.output_prefix}.json"
  settings = {k: v for k, v in run.settings.items() if k != "min_fraction_written"}
  shards.write_json(summary_file, stats.to_json(
      **settings, skipped=len(skipped), files=[os.path.basename(p) for p in output_files], storage=storage))
  shards.remove_markers(run.output_prefix, run.num_shards)
  report = ConversionReport(
      written=stats.written, skipped=skipped, without_boxes=run.plan.without_boxes,
      missing_pseudo_labels=run.plan.missing_pseudo_labels, output_files=output_files, summary_file=summary_file,
      storage=storage, reused_shards=len(run.done))
  logging.info("%s: %s; %s", run.manifest_path, report.summary_line(), report.storage_line())
  return report


def convert_manifest(manifest_path: str, output_prefix: str, *, short_side: int = DEFAULT_SHORT_SIDE,
                     jpeg_quality: int = DEFAULT_JPEG_QUALITY, fps: float = 0.0, num_shards: int = 1,
                     formats: Sequence[str] = ("tfrecord",), ego_logits: str | None = None,
                     object_logits: str | None = None, hand_object_dir: str | None = None,
                     allow_missing_pseudo_labels: bool = False, box_score_threshold: float = 0.5,
                     strict: bool = False, workers: int = 1, repair_boxes: bool = False,
                     min_fraction_written: float = 0.5, progress: bool = True) -> ConversionReport:
  """Converts every video of a manifest into record shards and a `<output_prefix>.json` summary.

  Raises ConversionError, writing nothing, when fewer than `min_fraction_written` of the rows (or none)
  could be written (module docstring). Shards completed by an interrupted earlier run with the same
  inputs and settings are kept, not rewritten (shards.py). `progress` draws a progress line on stderr."""
  if num_shards < 1 or short_side < 1 or workers < 1 or not 1 <= jpeg_quality <= 100:
    raise ValueError(f"bad settings: num_shards={num_shards}, short_side={short_side}, workers={workers}, "
                     f"jpeg_quality={jpeg_quality} (1..100)")
  run = prepare(
      manifest_path, output_prefix, short_side=short_side, jpeg_quality=jpeg_quality, fps=fps,
      num_shards=num_shards, formats=formats, ego_logits=ego_logits, object_logits=object_logits,
      hand_object_dir=hand_object_dir, allow_missing_pseudo_labels=allow_missing_pseudo_labels,
      box_score_threshold=box_score_threshold, repair_boxes=repair_boxes, min_fraction_written=min_fraction_written)
  markers, pool_holder, writer = dict(run.done), [], None
  bar = conversion_progress.Progress(len(run.plan.tasks), os.path.basename(output_prefix)) if progress else None
  try:
    results = _results(run.pending, workers, pool_holder)
    for s in range(num_shards):
      if s in run.done:
        if bar:
          bar.update(len(run.shard_tasks[s]), sum(e["num_frames"] for e in run.done[s]["entries"]),
                     len(run.done[s]["skipped"]), reused=len(run.shard_tasks[s]))
        continue
      writer = shards.ShardWriter(output_prefix, s, num_shards, run.formats)
      entries, shard_skipped = [], []
      for _ in run.shard_tasks[s]:
        result = next(results)
        failure = _report(manifest_path, result, strict)
        if failure is None:
          writer.write(records.encode_example(result.record))
          entries.append(shards.record_entry(result.record, result.seconds, result.source_bytes))
        else:
          shard_skipped.append(failure)
        if bar:
          bar.update(1, 0 if failure else result.record.num_frames, 1 if failure else 0)
      markers[s] = writer.finish({"fingerprint": run.fingerprints[s], "entries": entries, "skipped": shard_skipped})
      writer = None
  except Exception:
    if writer is not None:
      writer.abort()
    shards.discard(output_prefix, num_shards, run.formats)  # a failed run writes nothing
    raise
  except BaseException:  # Ctrl-C: completed shards stay for a rerun to keep
    if writer is not None:
      writer.abort()
    raise
  finally:
    for pool in pool_holder:
      pool.terminate()
      pool.join()
    if bar:
      bar.close()
  return finish(run, markers)


def _report(manifest_path: str, result: RowResult, strict: bool) -> tuple[str, str] | None:
  """Logs a row's warnings; returns (path, reason) for a skipped row (ConversionError when strict)."""
  where = f"{manifest_path}:{result.row.line}: {result.row.path}"
  for warning in result.warnings:
    logging.warning("%s: %s", where, warning)
  if result.failure is None:
    return None
  if strict:
    raise ConversionError(f"{result.row.file} (manifest line {result.row.line}): {result.failure}")
  logging.warning("%s: skipped: %s", where, result.failure)
  return (result.row.path, result.failure)


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
  flags.DEFINE_integer("short_side", DEFAULT_SHORT_SIDE, "Short side of stored frames (never upscaled).")
  flags.DEFINE_integer("jpeg_quality", DEFAULT_JPEG_QUALITY, "JPEG quality of stored frames, 1..100.")
  flags.DEFINE_float("fps", 0.0, "Store at most this many frames per second (faster videos drop frames; "
                     "0: every frame).")
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
  flags.DEFINE_bool("progress", True, "A progress line on stderr (redrawn on a terminal, every 30 s otherwise).")
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
        repair_boxes=f.repair_boxes, min_fraction_written=f.min_fraction_written, fps=f.fps,
        progress=f.progress)
  except ConversionError as e:
    sys.exit(f"error: {e}")
  print(report.summary_line())
  print(report.storage_line())
  if report.reused_shards:
    print(f"kept {report.reused_shards} shards completed by an interrupted earlier run")
  print(f"summary: {report.summary_file}")


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
