r"""The converter on Apache Beam (the engine tensorflow-datasets builds on), for datasets past one machine.

    pip install -r requirements-beam.txt
    python -m egoexo_jax.input.convert_beam --manifest=data/manifest.csv --output_prefix=/tmp/rec/train \
        --num_shards=64 -- --runner=DirectRunner --direct_num_workers=8 --direct_running_mode=multi_processing

Arguments after `--` are Beam pipeline options (e.g. `--runner=DataflowRunner --project=...` or
`--runner=FlinkRunner --flink_master=...`). The pipeline's elements are manifest rows: each is decoded and
encoded by `convert_video.convert_row` on whichever worker gets it (rows are reshuffled so a cluster
spreads them), grouped by shard (row i goes to shard i % N, as locally), ordered by manifest row inside
the shard and written by `shards.ShardWriter`, so the shards are byte-identical to `convert.py`'s with the
same settings and library versions. Reading the manifest and teacher files, resuming (shards whose done
marker matches are not converted again), the written-fraction check, the final rename and the summary
JSON run on the launching machine, with the same code as `convert.py`.

`output_prefix` must be on a file system every worker and the launcher can rename files in (local, NFS,
a FUSE-mounted bucket): the shards are renamed into place atomically, as locally. Strict mode is not
offered: a failing row is skipped and counted, as in a non-strict local run.
"""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

from absl import app
from absl import flags
from absl import logging

from egoexo_jax.input import convert, convert_video, records, shards


def _convert(task: convert_video.RowTask, manifest_path: str, num_shards: int) -> tuple[int, tuple]:
  """One row -> (shard, (row index, encoded record or None, summary entry or None, (path, reason) or None))."""
  result = convert_video.convert_row(task)
  failure = convert._report(manifest_path, result, strict=False)  # pylint: disable=protected-access
  if failure is not None:
    return task.index % num_shards, (task.index, None, None, failure)
  entry = shards.record_entry(result.record, result.seconds, result.source_bytes)
  return task.index % num_shards, (task.index, records.encode_example(result.record), entry, None)


def _write_shard(element: tuple[int, Iterable[tuple]], output_prefix: str, num_shards: int,
                 formats: Sequence[str], fingerprints: Sequence[str], expected: Sequence[int]) -> int:
  """Writes one shard from its rows' results, in manifest order; returns the shard number."""
  shard, items = element
  items = sorted(items, key=lambda item: item[0])
  if len(items) != expected[shard]:
    raise RuntimeError(f"shard {shard}: {len(items)} rows arrived, {expected[shard]} expected")
  writer = shards.ShardWriter(output_prefix, shard, num_shards, formats)
  try:
    for _, data, _, _ in items:
      if data is not None:
        writer.write(data)
    writer.finish({"fingerprint": fingerprints[shard], "entries": [e for _, _, e, _ in items if e is not None],
                   "skipped": [f for _, _, _, f in items if f is not None]})
  except BaseException:
    writer.abort()
    raise
  return shard


def convert_manifest_beam(manifest_path: str, output_prefix: str, *, pipeline_args: Sequence[str] = (),
                          **settings) -> convert.ConversionReport:
  """`convert.convert_manifest` as a Beam pipeline; `settings` are its keyword arguments except strict,
  workers and progress. Beam's runner and its options come from `pipeline_args` (DirectRunner by default)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top  (optional: requirements-beam.txt)
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

  run = convert.prepare(manifest_path, output_prefix, **settings)
  pending = run.pending
  if pending:
    expected = [len(tasks) for tasks in run.shard_tasks]
    with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as pipeline:
      _ = (pipeline
           | "Rows" >> beam.Create(pending)
           | "Spread" >> beam.Reshuffle()
           | "Convert" >> beam.Map(_convert, manifest_path, run.num_shards)
           | "ByShard" >> beam.GroupByKey()
           | "Write" >> beam.Map(_write_shard, output_prefix, run.num_shards, run.formats, run.fingerprints,
                                 expected))
  markers = {}
  for s in range(run.num_shards):
    if s in run.done:
      markers[s] = run.done[s]
    elif run.shard_tasks[s]:
      markers[s] = shards.completed_shard(output_prefix, s, run.num_shards, run.formats, run.fingerprints[s])
      if markers[s] is None:
        raise RuntimeError(f"{output_prefix}: the pipeline finished without completing shard {s}")
    else:  # more shards than rows: an empty shard, as the local converter writes
      markers[s] = shards.ShardWriter(output_prefix, s, run.num_shards, run.formats).finish(
          {"fingerprint": run.fingerprints[s], "entries": [], "skipped": []})
  return convert.finish(run, markers)


def _define_flags() -> None:
  flags.DEFINE_string("manifest", None, "CSV manifest (convert.py's format).")
  flags.DEFINE_string("output_prefix", None, "Output files are <prefix>.<format>-0000i-of-0000N.")
  flags.DEFINE_integer("short_side", convert.DEFAULT_SHORT_SIDE, "Short side of stored frames (never upscaled).")
  flags.DEFINE_integer("jpeg_quality", convert.DEFAULT_JPEG_QUALITY, "JPEG quality of stored frames, 1..100.")
  flags.DEFINE_float("fps", 0.0, "Store at most this many frames per second (0: every frame).")
  flags.DEFINE_integer("num_shards", 1, "Shards per format; manifest row i goes to shard i % N.")
  flags.DEFINE_list("formats", ["tfrecord"], f"Output formats, among {convert.FORMATS}.")
  flags.DEFINE_string("ego_logits", None, "Pickle(s), comma-separated, {manifest path or video_id: 2 logits}.")
  flags.DEFINE_string("object_logits", None, "Pickle(s), comma-separated, {manifest path or video_id: K logits}.")
  flags.DEFINE_string("hand_object_dir", None, "Folder of per-video detector .npy files.")
  flags.DEFINE_bool("allow_missing_pseudo_labels", False, "Leave a teacher field absent where its pickle lacks it.")
  flags.DEFINE_float("min_fraction_written", 0.5, "Fail, writing nothing, under this fraction of videos.")
  flags.mark_flags_as_required(["manifest", "output_prefix"])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  try:
    report = convert_manifest_beam(
        f.manifest, f.output_prefix, pipeline_args=argv[1:], short_side=f.short_side,
        jpeg_quality=f.jpeg_quality, fps=f.fps, num_shards=f.num_shards, formats=f.formats,
        ego_logits=f.ego_logits, object_logits=f.object_logits, hand_object_dir=f.hand_object_dir,
        allow_missing_pseudo_labels=f.allow_missing_pseudo_labels, min_fraction_written=f.min_fraction_written)
  except convert.ConversionError as e:
    sys.exit(f"error: {e}")
  logging.info("done")
  print(report.summary_line())
  print(report.storage_line())


if __name__ == "__main__":
  _define_flags()
  app.run(main)
