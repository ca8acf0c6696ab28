r"""Converter throughput and storage: `convert.convert_manifest` against a bare PyAV + Pillow peer, in one run.

  python bench/converter.py                                   # data/clips, old and new defaults (~1 min)
  python bench/converter.py --clips=/data/k400_sample --settings=320:90,320:75,256:75 --workers=4

Each --settings entry is short_side:jpeg_quality. For each, over every video of --clips (whole videos):
- egoexo_jax: `convert.convert_manifest` into a temporary folder (--formats; progress off), timed in CPU
  seconds of this process and its worker processes. Reported: videos and frames per CPU-second, stored
  bytes per second of video and per hour, the ratio to the source files' bytes (what the converter's
  summary line prints).
- peer: the least any converter must do for the same frames: PyAV decodes every frame, swscale resizes it
  to the same stored size (`frame.reformat`), Pillow encodes the same JPEG, the bytes are dropped; no
  records, no shards. The ratio egoexo_jax / peer shows the converter's own overhead.
- reading cost: Pillow decodes every stored JPEG frame of the egoexo_jax records back to RGB, in
  frames per CPU-second: what a smaller file costs the input pipeline (bench/input_pipeline.py measures
  whole training clips).
CPU time counts all cores, so a busy shared machine skews wall time but not the ratios much.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import pathlib
import resource
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import av
from PIL import Image

from egoexo_jax.input import convert, convert_video, sources

flags.DEFINE_string("clips", str(ROOT / "data" / "clips"), "Folder of videos (.mp4, .avi, .mkv, .webm).")
flags.DEFINE_list("settings", ["320:90", "256:90", "320:75", "256:75", "320:70"],
                  "short_side:jpeg_quality pairs to measure (the first is the baseline of the ratios).")
flags.DEFINE_list("formats", ["tfrecord"], "Record formats the converter writes.")
flags.DEFINE_integer("workers", 1, "Converter worker processes.")
flags.DEFINE_float("fps", 0.0, "The converter's --fps (0: every frame).")
FLAGS = flags.FLAGS


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peer_convert(files: list[str], short_side: int, quality: int) -> int:
  """PyAV decode + swscale resize + Pillow JPEG encode of every frame; returns the frame count."""
  frames = 0
  for file in files:
    with av.open(file, metadata_errors="ignore") as container:
      for frame in container.decode(video=0):
        width, height = convert_video.stored_size(frame.width, frame.height, short_side)
        buffer = io.BytesIO()
        frame.reformat(width=width, height=height, format="rgb24").to_image().save(buffer, "JPEG", quality=quality)
        frames += 1
  return frames


def read_back(pattern: str) -> tuple[int, float]:
  """(frames, CPU seconds) to decode every stored JPEG of the records to RGB."""
  source = sources.open_records(pattern)
  jpegs = [jpeg for i in range(len(source)) for jpeg in source[i].frames]
  start = cpu_seconds()
  for jpeg in jpegs:
    Image.open(io.BytesIO(jpeg)).convert("RGB").load()
  return len(jpegs), cpu_seconds() - start


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # the converter's per-video warnings would hide the table
  files = sorted(p for p in glob.glob(os.path.join(FLAGS.clips, "*")) if p.endswith((".mp4", ".avi", ".mkv", ".webm")))
  if not files:
    raise SystemExit(f"error: no videos in {FLAGS.clips}")
  with tempfile.TemporaryDirectory() as folder:
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["path", "labels"])
      writer.writerows([file, "0"] for file in files)
    print(f"{len(files)} videos, {sum(os.path.getsize(p) for p in files) / 1e6:.1f} MB of source, "
          f"formats {','.join(FLAGS.formats)}, {FLAGS.workers} worker(s), fps {FLAGS.fps:g}")
    print(f"{'setting':>8} | {'videos/cpu-s':>12} {'frames/cpu-s':>12} {'peer fr/cpu-s':>13} {'ratio':>5} | "
          f"{'kB/s video':>10} {'GB/hour':>7} {'x source':>8} | {'read fr/cpu-s':>13}")
    for setting in FLAGS.settings:
      short_side, quality = (int(x) for x in setting.split(":"))
      prefix = os.path.join(folder, f"out_{short_side}_{quality}", "train")
      start = cpu_seconds()
      report = convert.convert_manifest(manifest, prefix, short_side=short_side, jpeg_quality=quality,
                                        formats=FLAGS.formats, workers=FLAGS.workers, fps=FLAGS.fps,
                                        progress=False, min_fraction_written=0.0)
      ours_cpu = cpu_seconds() - start
      with open(report.summary_file) as f:
        frames_written = json.load(f)["num_frames"]["total"]
      start = cpu_seconds()
      peer_frames = peer_convert(files, short_side, quality)
      peer_cpu = cpu_seconds() - start
      read_frames, read_cpu = read_back(f"{prefix}.{FLAGS.formats[0]}-*")
      fmt = FLAGS.formats[0]
      per_second = report.storage["bytes_per_second"][fmt]
      ours_rate, peer_rate = frames_written / ours_cpu, peer_frames / peer_cpu
      print(f"{setting:>8} | {report.written / ours_cpu:12.2f} {ours_rate:12.1f} {peer_rate:13.1f} "
            f"{ours_rate / peer_rate:5.2f} | {per_second / 1e3:10.1f} {per_second * 3600 / 1e9:7.2f} "
            f"{report.storage['ratio_to_source'][fmt]:8.2f} | {read_frames / read_cpu:13.0f}")
      if report.skipped:
        print(f"         skipped: {report.skipped}")


if __name__ == "__main__":
  app.run(main)
