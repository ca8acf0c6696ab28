r"""Training-step speed: egoexo_jax's Ego-Exo step against the PyTorch Slow-only ResNet, in one run.

  python bench/train_step.py                  # CPU: the `small` model, batch 8, 112^2, 8 frames (~1 min)
  python bench/train_step.py --size=r50       # GPU default: Slow-only R50 8x8, batch 32, 224^2, bfloat16
  python bench/train_step.py --size=r50 --batch_size=64 --steps=50 --torch_compile=off

Measured on random clips that stay on the device (no input pipeline): the median time of a step, each
step blocked on before the next, after warm-up steps (the first compiles). On CPU the sides' timed steps
alternate, one step of each per round, so that other processes sharing the cores slow all sides alike;
on GPU they run one after the other (--interleave overrides either way).
- egoexo_jax: `train.make_step_fn` on a mesh over all local devices, state from `create_sharded_state`,
  the config from configs/egoexo.py ('' for --size=r50, 'small' for --size=small) with the flags'
  overrides. One step = normalise uint8 clips, forward, the full Ego-Exo loss (action cross-entropy +
  Ego-Score KL + Object-Score KL + interaction-map BCE against random teacher targets), backward,
  SGD-momentum (Nesterov) with weight decay, BatchNorm statistics update.
- PyTorch peer (bench/torch_slow_resnet.py, NCTHW as PySlowFast): the same backbone + action head,
  cross-entropy, backward, torch.optim.SGD (momentum 0.9, Nesterov, weight decay 1e-4 on every
  parameter). On CUDA: eager and torch.compile, bf16 autocast when --dtype=bfloat16; on CPU: eager
  float32 (compile is skipped by default there, it takes minutes; --torch_compile=on forces it).
The JAX step does more work (the ego/object/interaction heads and their losses: +9% forward MACs at
R50 size, +26% for `small`, whose backbone is tiny); the printout says how much. MFU = analytic train
FLOPs (3 x 2 x forward MACs) / step time / peak, printed only where a peak is known (H100/H200 bf16,
about 800 TFLOP/s measured).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time

# JAX and PyTorch share the GPU in this process: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
import torch

import torch_slow_resnet
from configs import egoexo as egoexo_config
from egoexo_jax import objectives, sharding, train
from egoexo_jax.input import transforms
from egoexo_jax.models import backbones
from egoexo_jax.models.resnet3d import STAGE_SPATIAL_STRIDES

flags.DEFINE_enum("size", None, ["small", "r50"], "Model size; default r50 on GPU, small on CPU.")
flags.DEFINE_integer("batch_size", None, "Global batch; default 32 (r50) or 8 (small).")
flags.DEFINE_alias("batch", "batch_size")  # the name of earlier commands
flags.DEFINE_integer("crop", None, "Crop side; default from the config (224 r50, 112 small).")
flags.DEFINE_integer("frames", None, "Frames per clip; default from the config (8).")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Compute dtype; default bfloat16 on GPU, float32 on CPU.")
flags.DEFINE_integer("steps", None, "Timed steps; default 30 on GPU, 10 on CPU.")
flags.DEFINE_integer("warmup", None, "Untimed steps first (the first one compiles); default 5 on GPU, 2 on CPU.")
flags.DEFINE_bool("torch", True, "Also time the PyTorch peer.")
flags.DEFINE_enum("torch_compile", "auto", ["auto", "on", "off"], "torch.compile row; auto: on CUDA only.")
flags.DEFINE_bool("interleave", None, "Alternate the sides' timed steps (default on CPU, where other processes "
                  "may share the cores); off times them one after the other (default on GPU: less memory).")
FLAGS = flags.FLAGS

R50_PUBLISHED_GMACS = 41.7  # Slow-only R50 8x8 at 224^2 (PySlowFast model zoo: 54.52 at 256^2)
PEAK_TFLOPS = {("H100", "bfloat16"): 800.0, ("H200", "bfloat16"): 790.0}  # measured bf16 matmul peaks


# --------------------------------------------------------------------------- analytic cost


def conv_out(size: int, kernel: int, stride: int) -> int:
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


def slow_resnet_macs(stage_blocks, width, temporal_kernels, frames, crop, num_classes, *,
                     num_object_classes=0, interaction_channels=0) -> dict[str, int]:
  """Multiply-accumulates of one clip's forward pass, conv and linear layers only (BN, ReLU, pooling free).

  'network': backbone + action head (what both sides run); 'ego_heads': Ego-Exo's ego, object and
  interaction heads (0 when their sizes are 0). No temporal stride, so every layer sees all frames.
  """
  side = conv_out(crop, 7, 2)
  macs = frames * side * side * 3 * width * 7 * 7  # stem conv
  side, in_width = conv_out(side, 3, 2), width  # stem max-pool
  for stage, (num_blocks, kt) in enumerate(zip(stage_blocks, temporal_kernels, strict=True)):
    inner = width * 2**stage
    for block in range(num_blocks):
      out_side = conv_out(side, 3, STAGE_SPATIAL_STRIDES[stage] if block == 0 else 1)
      per_frame = (side * side * in_width * inner * kt  # conv_a (kt, 1, 1)
                   + out_side * out_side * inner * inner * 9  # conv_b (1, 3, 3), strided
                   + out_side * out_side * inner * 4 * inner)  # conv_c
      if block == 0:
        per_frame += out_side * out_side * in_width * 4 * inner  # projection shortcut
      macs += frames * per_frame
      side, in_width = out_side, 4 * inner
  ego_heads = in_width * (2 + num_object_classes)
  if interaction_channels:
    ego_heads += frames * side * side * interaction_channels * (in_width * 9 + 2)
  return {"network": macs + in_width * num_classes, "ego_heads": ego_heads}


# --------------------------------------------------------------------------- timing


def measure(builders, steps: int, warmup: int, interleave: bool) -> list[dict]:
  """Times each runner; a builder returns (step, info) where `step()` blocks until its work is done.

  Each runner first makes `warmup` untimed calls (the first compiles; its time is kept as 'first_s'),
  then `steps` timed ones, whose median is 'median_s'. Interleaved, all runners live at once and the
  timed calls alternate (one step of each per round), so load from other processes on a shared host
  hits every side alike; otherwise each runner is built, timed and dropped in turn (less memory held).
  """

  def warm(step, info):
    tick = time.perf_counter()
    step()
    info["first_s"] = time.perf_counter() - tick
    for _ in range(warmup - 1):
      step()

  def timed(step) -> float:
    tick = time.perf_counter()
    step()
    return time.perf_counter() - tick

  results = []
  if interleave:
    runners = [build() for build in builders]
    for step, info in runners:
      warm(step, info)
    times = [[] for _ in runners]
    for _ in range(steps):
      for (step, _), runner_times in zip(runners, times):
        runner_times.append(timed(step))
    for (_, info), runner_times in zip(runners, times):
      results.append(dict(info, median_s=statistics.median(runner_times)))
  else:
    for build in builders:
      step, info = build()
      warm(step, info)
      results.append(dict(info, median_s=statistics.median(timed(step) for _ in range(steps)),
                          peak_bytes=info["peak_memory"]()))
      del step
  for info in results:  # interleaved: read once every runner has run (PyTorch's figure covers all its runners)
    info.setdefault("peak_bytes", info["peak_memory"]())
  return results


def random_batch(config, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A batch shaped like `objectives.egoexo.example_batch`: random clips, labels and teacher targets, all signals present."""
  batch = {}
  for key, spec in objectives.resolve(config).example_batch(config, batch_size).items():
    if key == "clips":
      batch[key] = rng.integers(0, 256, spec.shape, np.uint8)
    elif key == "labels":
      batch[key] = rng.integers(0, config.model.num_classes["action"], spec.shape).astype(np.int32)
    elif key == "interaction_map":
      batch[key] = rng.uniform(size=spec.shape).astype(np.float32)
    elif key.startswith("has_"):
      batch[key] = np.ones(spec.shape, np.float32)
    else:  # teacher logits
      batch[key] = rng.normal(size=spec.shape).astype(np.float32)
  return batch


def build_jax(config):
  """egoexo_jax's own train step, compiled ahead of time; info carries compile time and XLA's FLOP count."""
  mesh = sharding.make_mesh(config.mesh.num_devices)
  sharding.check_batch_divisible(config.global_batch_size, mesh)
  objective = objectives.resolve(config)
  optimizer, schedule = train.make_optimizer(config)
  state, state_shardings = train.create_sharded_state(objective, optimizer, config, mesh)
  step_fn = train.make_step_fn(objective, optimizer, schedule, config, mesh, state_shardings)
  batch = sharding.host_batch_to_global(random_batch(config, config.global_batch_size, np.random.default_rng(0)),
                                        mesh)
  tick = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - tick
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  carry = [state]

  def step():
    carry[0], _, terms = compiled(carry[0], batch)
    jax.block_until_ready((carry[0], terms))

  devices = jax.devices()
  info = {"name": "egoexo_jax (Flax linen, jit)", "device": f"{len(devices)} x {devices[0].device_kind}",
          "compile_s": compile_s, "xla_flops": cost.get("flops"),
          "peak_memory": lambda: (devices[0].memory_stats() or {}).get("peak_bytes_in_use")}
  return step, info


def build_torch(config, device: torch.device, autocast: bool, compile_model: bool):
  """The PyTorch peer's step: normalise uint8 clips, forward (autocast), cross-entropy, backward, SGD."""
  model_config, data = config.model, config.data
  torch.manual_seed(0)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  arch = torch_slow_resnet.resolved_arguments(*backbones.backbone_arguments(model_config.backbone,
                                                                             model_config.backbone_args))
  model = torch_slow_resnet.SlowResNet(arch["stage_blocks"], arch["width"], arch["temporal_kernels"],
                                       model_config.num_classes["action"], model_config.dropout_rate).to(device).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=config.optimizer.momentum,
                              nesterov=config.optimizer.nesterov, weight_decay=config.optimizer.weight_decay)
  forward = torch.compile(model) if compile_model else model
  batch = config.global_batch_size
  clips = torch.randint(0, 256, (batch, 3, data.clip_length, data.crop_size, data.crop_size), dtype=torch.uint8,
                        device=device)
  labels = torch.randint(0, model_config.num_classes["action"], (batch,), device=device)

  step = torch_slow_resnet.make_train_step(forward, optimizer, clips, labels, mean=transforms.MEAN, std=transforms.STD,
                                           autocast=autocast)

  name = "PyTorch " + ("torch.compile" if compile_model else "eager") + (" bf16 autocast" if autocast else " float32")
  where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
  peak = (lambda: torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else (lambda: None)
  return step, {"name": name, "device": where, "compile_s": None, "compiles_on_first_call": compile_model,
                "peak_memory": peak}


# --------------------------------------------------------------------------- main


def make_config(on_gpu: bool):
  size = FLAGS.size or ("r50" if on_gpu else "small")
  config = egoexo_config.get_config("" if size == "r50" else "small")
  config.global_batch_size = FLAGS.batch_size or (32 if size == "r50" else 8)
  config.data.crop_size = FLAGS.crop or config.data.crop_size
  config.data.clip_length = FLAGS.frames or config.data.clip_length
  config.model.dtype = FLAGS.dtype or ("bfloat16" if on_gpu else "float32")
  return size, config


def main(argv):
  del argv
  on_gpu = jax.default_backend() == "gpu"
  size, config = make_config(on_gpu)
  steps = FLAGS.steps or (30 if on_gpu else 10)
  warmup = max(1, FLAGS.warmup or (5 if on_gpu else 2))
  model, data, batch = config.model, config.data, config.global_batch_size

  r50 = slow_resnet_macs((3, 4, 6, 3), 64, (1, 1, 3, 3), 8, 224, 400)["network"]
  print(f"analytic check: Slow-only R50 8x8 at 224^2 = {r50 / 1e9:.2f} GMAC forward (published {R50_PUBLISHED_GMACS})")
  assert abs(r50 / 1e9 - R50_PUBLISHED_GMACS) < 0.1, r50
  arch = torch_slow_resnet.resolved_arguments(*backbones.backbone_arguments(model.backbone, model.backbone_args))
  macs = slow_resnet_macs(arch["stage_blocks"], arch["width"], arch["temporal_kernels"], data.clip_length, data.crop_size,
                          model.num_classes["action"], num_object_classes=model.num_object_classes,
                          interaction_channels=model.interaction_channels)
  jax_flops = 6 * (macs["network"] + macs["ego_heads"])  # per clip per train step
  torch_flops = 6 * macs["network"]
  print(f"config: --size={size} ({data.clip_length}x{data.frame_stride}, {data.crop_size}^2, width {arch['width']}, "
        f"blocks {tuple(arch['stage_blocks'])}), batch {batch}, dtype {model.dtype}, {steps} timed steps after "
        f"{warmup} warm-up; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU cores")
  print(f"forward per clip: backbone + action head {macs['network'] / 1e9:.3f} GMAC (both sides); Ego-Exo heads "
        f"(ego, object, interaction) +{macs['ego_heads'] / 1e9:.3f} GMAC "
        f"(+{100 * macs['ego_heads'] / macs['network']:.1f}%, JAX only); train step ~ 3 x 2 x MACs")

  torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  builders = [lambda: build_jax(config)]
  if FLAGS.torch:
    if torch_device.type == "cuda":
      torch.backends.cudnn.benchmark = True
    use_compile = FLAGS.torch_compile == "on" or (FLAGS.torch_compile == "auto" and torch_device.type == "cuda")
    autocast = torch_device.type == "cuda" and model.dtype == "bfloat16"
    if model.dtype == "bfloat16" and not autocast:
      print("note: PyTorch on CPU runs float32 (no bf16 autocast peer on CPU)")
    builders.append(lambda: build_torch(config, torch_device, autocast, False))
    if use_compile:
      builders.append(lambda: build_torch(config, torch_device, autocast, True))
    else:
      print("torch.compile: skipped (" + ("--torch_compile=off" if FLAGS.torch_compile == "off" else
                                          "off by default on CPU, where compiling takes minutes") + ")")
  interleave = FLAGS.interleave if FLAGS.interleave is not None else not on_gpu
  print(f"timing: {'interleaved (one step of each side per round)' if interleave else 'one side after the other'}")
  results = measure(builders, steps, warmup, interleave)
  xla = results[0]["xla_flops"]
  if xla:
    print(f"XLA's own count for the JAX step: {xla / batch / 1e9:.2f} GFLOP per clip (analytic {jax_flops / 1e9:.2f})")

  peak = next((v for (chip, dtype), v in PEAK_TFLOPS.items()
               if chip in jax.devices()[0].device_kind and dtype == model.dtype), None) if on_gpu else None
  jax_clips = batch / results[0]["median_s"]
  print()
  print("JAX: backbone + action + ego/object/interaction heads and the full Ego-Exo loss; "
        "PyTorch: backbone + action head, cross-entropy only")
  header = f"{'implementation':34} {'device':26} {'batch':>5} {'ms/step':>9} {'clips/s':>9} {'MFU':>6} " \
           f"{'peak GiB':>8} {'compile s':>9} {'JAX/this':>8}"
  print(header)
  print("-" * len(header))
  for i, r in enumerate(results):
    flops = jax_flops if i == 0 else torch_flops
    clips = batch / r["median_s"]
    mfu = f"{100 * flops * clips / (peak * 1e12):.1f}%" if peak else "n/a"
    mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "n/a"
    compile_s = r["first_s"] if r.get("compiles_on_first_call") else r["compile_s"]  # torch.compile: first step
    compile_s = "-" if compile_s is None else f"{compile_s:.1f}"
    print(f"{r['name']:34} {r['device'][:26]:26} {batch:5d} {1e3 * r['median_s']:9.1f} {clips:9.1f} {mfu:>6} "
          f"{mem:>8} {compile_s:>9} {jax_clips / clips:8.2f}")
  if not peak:
    print("MFU: printed only on a GPU with a known peak (H100/H200 bf16)")
  print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU cores (other processes skew timings)")


if __name__ == "__main__":
  app.run(main)
