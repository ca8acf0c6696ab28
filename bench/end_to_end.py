r"""End-to-end training speed: real records -> Grain -> device -> train step, against the step alone and
against a PySlowFast-style PyAV loader feeding the same step, in one run.

  python bench/end_to_end.py --workers=0,1                     # CPU: the `small` model, batch 8 (~3 min on 2 cores)
  python bench/end_to_end.py --size=r50 --batch_size=64 --workers=8,16 --min_seconds=60   # one GPU
  python bench/end_to_end.py --size=r50 --short_side=256 --jpeg_quality=75 ...           # lighter records

Rows, per worker count W (data.num_workers for Grain, DataLoader num_workers for the peer):
- step only: `train.make_step_fn` on a batch that stays on the device (random clips and teacher targets),
  each step blocked on: the clips/s the accelerator can take. With data.resize 'device' ('auto' on a GPU) the
  batch holds patches and windows, so the step includes the resize (input/device_resize.py).
- Grain end to end: configs/egoexo.py's pipeline (`egoexo_pipeline.make_train_dataset`) over records converted
  (untimed) from --manifest at --short_side / --jpeg_quality, then as the trainer does it: next batch, host
  keys popped, `host_batch_to_global`, the step dispatched, the previous step's loss read. Clips/s over at
  least --min_seconds after warm-up, and the fraction of that time spent waiting for data.
- PyAV peer end to end: bench/input_pipeline.py's PySlowFast-style loader (decodes the video files) feeding
  the same step; its float32 clips are turned back into uint8 on the host (counted) and its batches carry no
  teacher signals (masks 0), which changes no compute.
It also prints the Grain pipeline's clips per CPU-second and the CPU cores (workers) it would take to feed
the step-only rate: the figure that says whether CPU JPEG decoding keeps an accelerator fed.
Flags shared with bench/input_pipeline.py (--manifest, --pseudo_labels, --short_side, --jpeg_quality,
--format, --size (default here: r50 on GPU, small on CPU), --workers, --batch_size, --read_threads, --warmup_batches, --min_seconds, --min_batches).
"""

from __future__ import annotations

import copy
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch's loader shares the host
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

import input_pipeline  # the peer, the record conversion and the CPU-time helpers (and their flags)
from configs import egoexo as egoexo_config
from egoexo_jax import objectives, sharding, train
from egoexo_jax.input import convert, device_resize, egoexo_pipeline, transforms
from egoexo_jax.input.clip_sampler import clip_sampler
from egoexo_jax.objectives import egoexo as egoexo_objective

flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Compute dtype; default bfloat16 on GPU, float32 on CPU.")
flags.DEFINE_enum("resize", None, device_resize.RESIZES, "config data.resize; default the config's ('auto').")
flags.DEFINE_integer("step_only_steps", None, "Timed steps of the step-only row; default 30 on GPU, 5 on CPU.")
FLAGS = flags.FLAGS


def teacher_free_batch(config, clips: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """A batch of the Ego-Exo step's shapes from clips and labels only (teacher targets 0, masks 0)."""
  shapes = objectives.resolve(config).example_batch(config, len(clips))
  batch = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}
  batch["clips"], batch["labels"] = clips, labels.astype(np.int32) % config.model.num_classes["action"]
  return batch


def peer_batches(rows, config, workers: int):
  """bench/input_pipeline.py's PyAV loader, its float32 (B, 3, T, H, W) normalised clips back to uint8 (B, T, H, W, 3)."""
  for clips, labels in input_pipeline.peer_iterator(rows, config, workers):
    pixels = (clips.permute(0, 2, 3, 4, 1).numpy() * transforms.STD + transforms.MEAN) * 255.0
    yield teacher_free_batch(config, np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels.numpy())


def run_steps(step_fn, state, batches, mesh, batch_size: int):
  """Trains on `batches` as train.train_and_evaluate does; returns (state, clips/s, data-wait fraction, CPU
  measure of input_pipeline.measure's kind) after --warmup_batches untimed steps."""
  previous = None

  def one_step(state):
    nonlocal previous
    tick = time.perf_counter()
    batch, _ = train.split_host_keys(next(batches))
    batch = sharding.host_batch_to_global(batch, mesh)
    waited = time.perf_counter() - tick
    state, _, terms = step_fn(state, batch)
    if previous is not None:
      jax.block_until_ready(previous)  # the trainer reads each loss one step late
    previous = terms
    return state, waited

  for _ in range(FLAGS.warmup_batches):
    state, _ = one_step(state)
  jax.block_until_ready(previous)
  cpu_before = input_pipeline.cpu_seconds_by_process()
  tick, steps, wait = time.perf_counter(), 0, 0.0
  while steps < FLAGS.min_batches or time.perf_counter() - tick < FLAGS.min_seconds:
    state, waited = one_step(state)
    wait, steps = wait + waited, steps + 1
  jax.block_until_ready((state, previous))
  wall = time.perf_counter() - tick
  cpu = sum(t - cpu_before.get(pid, 0.0) for pid, t in input_pipeline.cpu_seconds_by_process().items())
  return state, {"clips_per_s": steps * batch_size / wall, "data_wait": wait / wall, "cores_busy": cpu / wall}


def main(argv):
  del argv
  on_gpu = jax.default_backend() == "gpu"
  size = FLAGS.size if FLAGS["size"].present else ("r50" if on_gpu else "small")  # --size defaults by device here
  config = egoexo_config.get_config("" if size == "r50" else "small")
  config.global_batch_size = FLAGS.batch_size
  config.model.dtype = FLAGS.dtype or ("bfloat16" if on_gpu else "float32")
  if FLAGS.read_threads:
    config.data.read_threads = FLAGS.read_threads
  if FLAGS.resize:
    config.data.resize = FLAGS.resize
  data = config.data
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_batch_divisible(config.global_batch_size, mesh)
  objective = objectives.resolve(config)
  grid = egoexo_objective.interaction_grid(objective.model, config)  # the maps' (t, h, w), as the trainer's
  optimizer, schedule = train.make_optimizer(config)
  state, state_shardings = train.create_sharded_state(objective, optimizer, config, mesh)
  step_fn = train.make_step_fn(objective, optimizer, schedule, config, mesh, state_shardings)
  devices = jax.devices()
  print(f"{len(devices)} x {devices[0].device_kind}; {config.model.backbone} ({config.model.dtype}), clips "
        f"{data.clip_length} x {data.crop_size}^2, batch {FLAGS.batch_size}; {os.cpu_count()} CPU cores, load "
        f"average {os.getloadavg()[0]:.1f}")

  # Step only: one batch that stays on the device.
  rng = np.random.default_rng(0)
  spec = objective.example_batch(config, FLAGS.batch_size)["clips"]
  resident = teacher_free_batch(config, rng.integers(0, 256, spec.shape, np.uint8),
                                rng.integers(0, 5, FLAGS.batch_size))
  if clip_sampler(config).sends_patches:  # the step resizes Grain's patches too
    resident["clips"], resident["clips_window"] = input_pipeline.random_patches(config, FLAGS.batch_size, rng)
  resident = sharding.host_batch_to_global(resident, mesh)
  tick = time.perf_counter()
  state, _, terms = step_fn(state, resident)
  jax.block_until_ready(terms)
  print(f"first step (compiles): {time.perf_counter() - tick:.1f} s")

  def time_step_only(state):
    """Clips/s of steps dispatched back to back on the resident batch (the trainer reads each loss a
    step late), over at least --min_seconds / 2 and --step_only_steps steps."""
    tick, steps = time.perf_counter(), 0
    while steps < (FLAGS.step_only_steps or (30 if on_gpu else 5)) or time.perf_counter() - tick < FLAGS.min_seconds / 2:
      state, _, terms = step_fn(state, resident)
      steps += 1
    jax.block_until_ready((state, terms))
    return state, steps * FLAGS.batch_size / (time.perf_counter() - tick)

  rows = convert.read_manifest(FLAGS.manifest)
  results = []
  with tempfile.TemporaryDirectory() as folder:
    pattern = input_pipeline.convert_records(folder)
    for workers in map(int, FLAGS.workers):
      state, step_only = time_step_only(state)  # next to each row: other processes' load drifts
      print(f"  step only: {step_only:.1f} clips/s", flush=True)
      grain_config = copy.deepcopy(config)
      grain_config.data.num_workers = workers
      iterator = iter(egoexo_pipeline.make_train_dataset(grain_config, pattern, grid=grid))
      try:
        state, grain_result = run_steps(step_fn, state, iterator, mesh, FLAGS.batch_size)
      finally:
        iterator.close()
      print(f"  {workers} workers: Grain end to end {grain_result['clips_per_s']:.1f} clips/s, data wait "
            f"{grain_result['data_wait']:.0%}", flush=True)
      peer_result = None
      if FLAGS.peer:
        state, peer_result = run_steps(step_fn, state, peer_batches(rows, config, workers), mesh, FLAGS.batch_size)
        print(f"  {workers} workers: PyAV peer end to end {peer_result['clips_per_s']:.1f} clips/s, data wait "
              f"{peer_result['data_wait']:.0%}", flush=True)
      # The pipeline alone, for its per-CPU-second rate.
      iterator = iter(egoexo_pipeline.make_train_dataset(grain_config, pattern, grid=grid))
      try:
        alone = input_pipeline.measure(iterator, FLAGS.batch_size)
      finally:
        iterator.close()
      results.append((workers, step_only, grain_result, peer_result, alone))
      print(f"  {workers} workers: pipeline alone {alone['clips_per_s']:.1f} clips/s, "
            f"{alone['clips_per_cpu_s']:.1f} per CPU-second", flush=True)

  print()
  print(f"records: {FLAGS.format} at short side {FLAGS.short_side}, JPEG quality {FLAGS.jpeg_quality}")
  header = (f"{'input':26} {'workers':>7} {'clips/s':>8} {'step only':>9} {'of step-only':>12} {'data wait':>9} "
            f"{'cores busy':>10}")
  print(header)
  print("-" * len(header))
  for workers, step_only, grain_result, peer_result, _ in results:
    for name, r in (("Grain records (egoexo_jax)", grain_result), ("PyAV from video (peer)", peer_result)):
      if r is not None:
        print(f"{name:26} {workers:7d} {r['clips_per_s']:8.1f} {step_only:9.1f} {r['clips_per_s'] / step_only:12.0%} "
              f"{r['data_wait']:9.0%} {r['cores_busy']:10.2f}")
  step_only = max(r[1] for r in results)
  per_cpu_s = max(alone["clips_per_cpu_s"] for *_, alone in results)
  print(f"Grain pipeline: {per_cpu_s:.1f} clips per CPU-second at best, so feeding the step-only rate "
        f"({step_only:.0f} clips/s) takes about {step_only / per_cpu_s:.2f} cores of decoding.")


if __name__ == "__main__":
  app.run(main)
