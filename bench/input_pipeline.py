r"""Input-pipeline speed: egoexo_jax's Grain train pipeline against a PySlowFast-style PyAV loader, in one run.

  python bench/input_pipeline.py                                     # 0, 1 workers x 3 repeats (~13 min on a busy 2-core box)
  python bench/input_pipeline.py --workers=0,4,8,16 --min_seconds=30   # a big box
  python bench/input_pipeline.py --format=array_record --size=small
  python bench/input_pipeline.py --workers=1 --peer=false --short_side=320 --jpeg_quality=75   # other records

Both sides make the same training clips from the videos of --manifest (default data/manifest.csv):
T = 8 frames tau = 8 apart from a random start inside a random manifest segment, short-side scale
jitter, a random square crop, a random horizontal flip (sizes from configs/egoexo.py; --size=r50: 224
crop from [256, 320], --size=small: 112 from [128, 160]), batched by --batch_size.
- egoexo_jax: the manifest is converted once, untimed, by `convert.convert_manifest` into a temporary
  folder, --format records at --short_side (JPEG frames plus the teacher signals, as users store their
  data); then `egoexo_pipeline.make_train_dataset` with data.num_workers = w runs: it reads a record, decodes the 8
  chosen JPEGs and resamples the crop window straight to the output size, rasterises the detector
  boxes into interaction maps. Out: uint8 clips (normalised later, on the device) + teacher targets.
  Measured once per --paths entry (data.decoder and data.resize, PATHS): 'exact' is the Pillow path of
  runs made before the fast decoder, 'fast' is input/jpeg_decode.py resizing on the CPU, 'device' (the
  default on a GPU or TPU) decodes and sends the window's stored pixels for the train step to resize
  (input/device_resize.py; that resize is the accelerator's work, timed separately at the end).
- peer: PySlowFast's Kinetics train path in a torch DataLoader with num_workers = w. It opens the
  original video with PyAV, seeks to just before the clip start, decodes frame by frame to the clip end,
  turns every decoded frame into an RGB array, picks 8 by linspace (temporal_sampling), normalises to
  float, rescales whole frames (bilinear interpolate), crops and flips. Out: float32 (C, T, H, W) clips.
Worker processes are spawned for both. Measured per worker count, after warm-up batches: clips/s for
at least --min_seconds, and the CPU time used by the process and its workers in that window, which gives
the cores kept busy and clips per CPU-second (per-core throughput); the cores that other processes used
meanwhile are printed too, since a shared machine skews the figures. With 0 workers Grain still decodes
in its --read_threads threads; the peer runs in the main process (torch's own intra-op threads only).
Each pipeline is measured --repeats times, the pipelines taking turns (exact, fast, peer, exact, ...) so
that a change in the machine's load falls on all of them; the table gives the median and the range of
clips per CPU-second and the ratios of the medians.
"""

from __future__ import annotations

import copy
import glob
import math
import os
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import av
import numpy as np
import psutil
import torch
import torch.nn.functional as F

from configs import egoexo as egoexo_config
from egoexo_jax import objectives
from egoexo_jax.input import convert, device_resize, egoexo_pipeline, stream, transforms
from egoexo_jax.objectives import egoexo as egoexo_objective

# name -> (data.decoder, data.resize): the exact Pillow path (runs before issue 19), the fast decoder resizing
# on the CPU, and the fast decoder leaving the resize to the accelerator (data.resize 'auto' on a GPU or TPU).
PATHS = {"exact": ("exact", "host"), "fast": ("fast", "host"), "device": ("fast", "device")}

flags.DEFINE_string("manifest", str(ROOT / "data" / "manifest.csv"), "Video manifest CSV (convert.py's format).")
flags.DEFINE_string("pseudo_labels", str(ROOT / "data" / "pseudo_labels"),
                    "Folder with ego_logits.pkl, object_logits.pkl and hand_object/ for the records ('' for none).")
flags.DEFINE_integer("short_side", 256, "Short side of the stored record frames (256: the README's convert setting).")
flags.DEFINE_integer("jpeg_quality", 75, "JPEG quality of the stored record frames (the converter's default: 75).")
flags.DEFINE_bool("peer", True, "Also measure the PySlowFast-style PyAV peer.")
flags.DEFINE_enum("format", "tfrecord", convert.FORMATS, "Record format to convert to and read.")
flags.DEFINE_enum("size", "r50", ["r50", "small"], "Data settings of configs/egoexo.py ('' or 'small').")
flags.DEFINE_list("workers", ["0", "1"], "Worker process counts to measure.")
flags.DEFINE_list("paths", list(PATHS), "Clip paths to measure: " + "; ".join(f"'{k}': data.decoder "
                  f"'{v[0]}', data.resize '{v[1]}'" for k, v in PATHS.items()) + ".")
flags.DEFINE_integer("breakdown_clips", 64, "Clips for the per-stage CPU cost breakdown (0: none).")
flags.DEFINE_integer("repeats", 3, "Measurements of each pipeline per worker count, taking turns.")
flags.DEFINE_integer("batch_size", 8, "Clips per batch.")
flags.DEFINE_integer("read_threads", None, "Grain read threads per process; default from the config.")
flags.DEFINE_integer("warmup_batches", 2, "Untimed batches first (worker start-up, first decodes).")
flags.DEFINE_float("min_seconds", 10.0, "Time each measurement for at least this long ...")
flags.DEFINE_integer("min_batches", 3, "... and at least this many batches.")
FLAGS = flags.FLAGS


# --------------------------------------------------------------------------- the PySlowFast-style peer


def pyav_decode_clip(path: str, start_sec: float, end_sec: float | None, num_frames: int, sampling_rate: int,
                     rng: random.Random) -> np.ndarray:
  """uint8 (num_frames, H, W, 3): PySlowFast's pyav_decode + temporal_sampling for one random clip.

  The clip spans num_frames * sampling_rate frames at the stream's average rate (target fps = video fps)
  and starts uniformly at random inside [start_sec, end_sec); decoding seeks to 1024 pts before it.
  """
  with av.open(path) as container:
    stream = container.streams.video[0]
    fps, time_base = float(stream.average_rate), float(stream.time_base)
    stream_start = stream.start_time or 0
    if end_sec is None:
      end_sec = float(stream.duration * stream.time_base) if stream.duration else container.duration / av.time_base
    clip_frames = num_frames * sampling_rate
    clip_start = start_sec + rng.uniform(0, max(end_sec - start_sec - clip_frames / fps, 0.0))
    start_pts = stream_start + int(clip_start / time_base)
    end_pts = start_pts + int(clip_frames / fps / time_base)
    container.seek(max(start_pts - 1024, 0), any_frame=False, backward=True, stream=stream)
    frames = {}
    for frame in container.decode(stream):
      if frame.pts < start_pts:
        continue
      frames[frame.pts] = frame  # PySlowFast keeps the first frame past the end too (buffer_size 0)
      if frame.pts > end_pts:
        break
    decoded = np.stack([frames[pts].to_rgb().to_ndarray() for pts in sorted(frames)])
  index = np.clip(np.linspace(0, clip_frames - 1, num_frames), 0, len(decoded) - 1).astype(np.int64)
  return decoded[index]


def spatial_sampling(clip: np.ndarray, min_side: int, max_side: int, crop: int, rng: random.Random) -> torch.Tensor:
  """PySlowFast's tensor_normalize, then spatial_sampling(spatial_idx=-1): float32 (3, T, crop, crop)."""
  frames = (torch.as_tensor(clip).float() / 255.0 - transforms.MEAN) / transforms.STD
  frames = frames.permute(3, 0, 1, 2)  # (C, T, H, W)
  height, width = frames.shape[2:]
  size = int(round(rng.uniform(min_side, max_side)))  # random_short_side_scale_jitter
  if width < height:
    new_size = (int(math.floor(height / width * size)), size)
  else:
    new_size = (size, int(math.floor(width / height * size)))
  frames = F.interpolate(frames, size=new_size, mode="bilinear", align_corners=False)
  y = rng.randint(0, frames.shape[2] - crop)  # random_crop
  x = rng.randint(0, frames.shape[3] - crop)
  frames = frames[:, :, y:y + crop, x:x + crop]
  if rng.uniform(0, 1) < 0.5:  # horizontal_flip
    frames = frames.flip(-1)
  return frames


class PyAVClips(torch.utils.data.Dataset):
  """Manifest segments -> (float32 clip (3, T, crop, crop), label), decoded from the video files."""

  def __init__(self, rows, data_config):
    self.rows, self.data = rows, data_config

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int):
    row, data, rng = self.rows[index], self.data, random.Random()  # seeded from the OS: differs per worker
    clip = pyav_decode_clip(row.file, row.start_sec or 0.0, row.end_sec, data.clip_length, data.frame_stride, rng)
    return spatial_sampling(clip, data.min_short_side, data.max_short_side, data.crop_size, rng), row.labels[0]


def peer_iterator(rows, config, workers: int):
  dataset = PyAVClips(rows, config.data)
  sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
  loader = torch.utils.data.DataLoader(dataset, batch_size=FLAGS.batch_size, sampler=sampler, drop_last=True,
                                       num_workers=workers, multiprocessing_context="spawn" if workers else None)
  return iter(loader)


# --------------------------------------------------------------------------- measuring

PEER = "PySlowFast-style PyAV"


def cpu_seconds_by_process() -> dict[int, float]:
  """User + system CPU seconds of this process and each live descendant (worker processes), by pid."""
  seconds = {}
  for process in [psutil.Process()] + psutil.Process().children(recursive=True):
    try:
      times = process.cpu_times()
      seconds[process.pid] = times.user + times.system
    except psutil.NoSuchProcess:
      pass
  return seconds


def system_busy_seconds() -> float:
  """CPU seconds all processes of the machine have used so far (every core summed)."""
  t = psutil.cpu_times()
  return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def measure(iterator, batch_size: int) -> dict:
  """Clips/s and CPU use of `iterator` after warm-up, and the cores other processes took meanwhile."""
  tick = time.perf_counter()
  for _ in range(FLAGS.warmup_batches):
    next(iterator)
  warmup_s = time.perf_counter() - tick
  cpu_before, system_before = cpu_seconds_by_process(), system_busy_seconds()
  tick, batches = time.perf_counter(), 0
  while batches < FLAGS.min_batches or time.perf_counter() - tick < FLAGS.min_seconds:
    next(iterator)
    batches += 1
  wall = time.perf_counter() - tick
  cpu_after, system = cpu_seconds_by_process(), system_busy_seconds() - system_before
  cpu = sum(t - cpu_before.get(pid, 0.0) for pid, t in cpu_after.items())
  clips = batches * batch_size
  return {"clips_per_s": clips / wall, "cores_busy": cpu / wall, "clips_per_cpu_s": clips / max(cpu, 1e-9),
          "others_busy": max(system - cpu, 0.0) / wall, "warmup_s": warmup_s}


def cost_breakdown(config, pattern: str, clips: int) -> None:
  """Single-threaded CPU milliseconds per training clip, by stage, over `clips` clips drawn as the train
  transform draws them: where the time goes, and what moving the resize to the accelerator would leave."""
  import simplejpeg  # pylint: disable=g-import-not-at-top

  source, data, rng = stream.open_train_records(config, pattern), config.data, np.random.default_rng(0)
  draws = []
  for i in range(clips):
    record = source[int(rng.integers(len(source)))]
    draws.append((i, record, transforms.sample_frame_indices(record.num_frames, data.clip_length, data.frame_stride,
                                                            rng, fps=record.fps,
                                                            target_fps=float(data.get("target_fps", 0.0))),
                   transforms.sample_crop_window(record.height, record.width, data.crop_size, data.min_short_side,
                                                 data.max_short_side, rng)))

  def decode_only(record, indices):
    for index in indices:
      simplejpeg.decode_jpeg(record.frames[int(index)])

  stages = {
      "read + parse the record": lambda i, record, indices, window: source[i % len(source)],
      "exact decode_and_crop": lambda i, record, indices, window: transforms.decode_and_crop(
          record.frames, indices, window, "exact"),
      "fast decode_and_crop": lambda i, record, indices, window: transforms.decode_and_crop(
          record.frames, indices, window, "fast"),
      "fast decode_patch (resize on device)": lambda i, record, indices, window: device_resize.decode_patch(
          record.frames, indices, window),
      "  of which JPEG decode": lambda i, record, indices, window: decode_only(record, indices),
  }
  seconds = {name: [] for name in stages}
  for _ in range(3):  # the stages take turns; the least of 3 passes each
    for name, stage in stages.items():
      tick = time.process_time()
      for draw in draws:
        stage(*draw)
      seconds[name].append(time.process_time() - tick)
  print(f"CPU ms per clip, one thread, {clips} clips, least of 3 passes: "
        + "; ".join(f"{name} {min(s) / clips * 1e3:.2f}" for name, s in seconds.items()))


def random_patches(config, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 patches, float32 windows) of a 'device' batch: random pixels, windows magnified 1-1.25x as the R50
  transform's on records at short side 256 (device_resize.py's batch keys 'clips' and 'clips_window')."""
  data, size = config.data, config.data.crop_size
  side = device_resize.patch_size(size)
  extent = rng.uniform(0.8 * size, size, batch_size)
  origin = rng.uniform(0.0, side - extent - 1.0)
  windows = np.stack([origin, origin, origin + extent, origin + extent, rng.integers(0, 2, batch_size)], 1)
  return rng.integers(0, 256, (batch_size, data.clip_length, side, side, 3), np.uint8), windows.astype(np.float32)


def device_resize_cost(config) -> None:
  """The accelerator's share of the 'device' path: the jitted resize of one batch of patches, on JAX's
  default device (this machine's CPU when it has no accelerator), per clip, least of 5 after compilation."""
  import jax  # pylint: disable=g-import-not-at-top

  size, side = config.data.crop_size, device_resize.patch_size(config.data.crop_size)
  patches, windows = jax.device_put(random_patches(config, FLAGS.batch_size, np.random.default_rng(0)))
  resize = jax.jit(device_resize.resize_clips, static_argnums=2)
  resize(patches, windows, size).block_until_ready()
  seconds = []
  for _ in range(5):
    tick = time.perf_counter()
    resize(patches, windows, size).block_until_ready()
    seconds.append(time.perf_counter() - tick)
  print(f"resize on the device ({jax.devices()[0].device_kind}): {min(seconds) / FLAGS.batch_size * 1e3:.2f} ms per "
        f"clip, batches of {FLAGS.batch_size} patches {side}^2 -> {size}^2 (wall time; inside the train step)")


def convert_records(folder: str) -> str:
  """Converts --manifest into TFRecords under `folder` (untimed); returns the record glob."""
  labels = pathlib.Path(FLAGS.pseudo_labels) if FLAGS.pseudo_labels else None
  prefix = os.path.join(folder, "train")
  tick = time.perf_counter()
  report = convert.convert_manifest(
      FLAGS.manifest, prefix, short_side=FLAGS.short_side,
      ego_logits=str(labels / "ego_logits.pkl") if labels else None,
      object_logits=str(labels / "object_logits.pkl") if labels else None,
      hand_object_dir=str(labels / "hand_object") if labels else None, formats=(FLAGS.format,),
      workers=max(1, os.cpu_count() or 1), jpeg_quality=FLAGS.jpeg_quality)
  size = sum(os.path.getsize(f) for f in glob.glob(f"{prefix}.{FLAGS.format}-*"))
  print(f"records: {report.summary_line()} ({FLAGS.format}) at short side {FLAGS.short_side}, JPEG quality "
        f"{FLAGS.jpeg_quality}, {size / 2**20:.1f} MiB, in {time.perf_counter() - tick:.1f} s (untimed)")
  return f"{prefix}.{FLAGS.format}-*"


def main(argv):
  del argv
  config = egoexo_config.get_config("" if FLAGS.size == "r50" else "small")
  config.global_batch_size = FLAGS.batch_size
  if FLAGS.read_threads:
    config.data.read_threads = FLAGS.read_threads
  data = config.data
  grid = egoexo_objective.interaction_grid(objectives.resolve(config).model, config)  # the trainer's map grid
  rows = convert.read_manifest(FLAGS.manifest)
  cores = os.cpu_count()
  sizes = []
  for file in sorted({row.file for row in rows}):
    with av.open(file) as container:
      stream = container.streams.video[0]
      sizes.append(f"{stream.codec_context.name} {stream.width}x{stream.height}")
  print(f"clips: {data.clip_length} x {data.frame_stride}, crop {data.crop_size} from short side "
        f"[{data.min_short_side}, {data.max_short_side}], batch {FLAGS.batch_size}; {len(rows)} segments of "
        f"{len(sizes)} videos ({', '.join(sizes)}); {cores} CPU cores, load average {os.getloadavg()[0]:.1f}")
  results = []  # (workers, pipeline name, [measurements])
  with tempfile.TemporaryDirectory() as folder:
    pattern = convert_records(folder)
    if FLAGS.breakdown_clips:
      cost_breakdown(config, pattern, FLAGS.breakdown_clips)
    for workers in map(int, FLAGS.workers):
      runs = {f"Grain, {path}": [] for path in FLAGS.paths}
      if FLAGS.peer:
        runs[PEER] = []
      for _ in range(FLAGS.repeats):
        for path in FLAGS.paths:
          grain_config = copy.deepcopy(config)
          grain_config.data.num_workers = workers
          grain_config.data.decoder, grain_config.data.resize = PATHS[path]
          iterator = iter(egoexo_pipeline.make_train_dataset(grain_config, pattern, grid=grid))
          runs[f"Grain, {path}"].append(measure(iterator, FLAGS.batch_size))
          iterator.close()
        if FLAGS.peer:
          iterator = peer_iterator(rows, config, workers)
          runs[PEER].append(measure(iterator, FLAGS.batch_size))
          del iterator  # stops the DataLoader's workers
        print(f"  {workers} workers: " + ", ".join(
            f"{name} {r[-1]['clips_per_cpu_s']:.1f}" for name, r in runs.items()) + " clips per CPU-second")
      results += [(workers, name, r) for name, r in runs.items()]

  print()
  print(f"Grain: {FLAGS.format} records at short side {FLAGS.short_side} (JPEG quality {FLAGS.jpeg_quality}), "
        f"{data.read_threads} read threads per process, uint8 out; peer: PyAV from the video files, float32 out; "
        f"median of {FLAGS.repeats} (range)")
  header = (f"{'pipeline':22} {'workers':>7} {'clips/s':>8} {'cores busy':>10} {'clips/CPU-s':>11} {'range':>13} "
            f"{'others busy':>11} {'/ exact':>7} {'/ peer':>7}")
  print(header)
  print("-" * len(header))
  median = lambda runs, key: float(np.median([r[key] for r in runs]))  # pylint: disable=unnecessary-lambda-assignment
  for workers, name, runs in results:
    per_core = {n: median(r, "clips_per_cpu_s") for w, n, r in results if w == workers}
    exact, peer = per_core.get("Grain, exact"), per_core.get(PEER)
    value = per_core[name]
    spread = [r["clips_per_cpu_s"] for r in runs]
    print(f"{name:22} {workers:7d} {median(runs, 'clips_per_s'):8.1f} {median(runs, 'cores_busy'):10.2f} "
          f"{value:11.2f} {min(spread):6.1f}-{max(spread):<6.1f} {median(runs, 'others_busy'):11.2f} "
          f"{value / exact if exact else float('nan'):7.2f} {value / peer if peer else float('nan'):7.2f}")
  print(f"cores busy: this process and its workers; others busy: cores other processes used meanwhile (of {cores}); "
        "ratios: clips per CPU-second against the exact path's and the peer's, same worker count")
  if "device" in FLAGS.paths:
    device_resize_cost(config)


if __name__ == "__main__":
  app.run(main)
