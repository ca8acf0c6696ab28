r"""Training-step speed of every backbone registered in egoexo_jax.models.backbones.BACKBONES.

  python bench/backbones.py                           # CPU: --size=small (thin widths, 112^2), every backbone
  python bench/backbones.py --size=full --batch_size=32    # GPU default: full networks at 224^2, bfloat16
  python bench/backbones.py --backbones=slow_r50,vit_b16 --remat=dots_with_no_batch_dims_saveable \
      --attention=cudnn --triton_gemm=false

One step = normalise uint8 clips (random, already on the device), forward of `egoexo.Model` with the
backbone and only the action head, softmax cross-entropy, backward, SGD with momentum 0.9, BatchNorm
statistics update; one jitted function on one device, the train state donated. Each backbone is
compiled ahead of time (the compile column), run `--warmup` times, then timed over `--steps` steps
(median, each step blocked on). The registry is read at run time, so new backbones are benched as
soon as they are registered; one that fails to build or run prints its error and the rest go on.

Clip shapes: CLIP_FRAMES below gives each backbone the clip length it is usually trained with
(SlowFast 32 Fast frames, of which Slow takes 8; the others 8), `--frames` overrides it for all.

Columns:
- GFLOP an. / xla: one train step's floating-point work per clip. 'an.' (analytic) = 3 x 2 x forward
  MACs, where known: Slow-only R50 8 x 224^2 (the published 41.7 GMAC) and the video ViT (counted
  from its shapes, matmuls only). 'xla' = XLA's `compiled.cost_analysis()['flops']` / batch.
- MFU: the analytic work (XLA's where there is none) x clips/s over the GPU's dense bf16 peak
  (H100 SXM / H200: 989 TFLOP/s; DESIGN.md measured about 800 for plain matmuls), printed for
  bfloat16 runs on a known GPU only.
- plan GiB: XLA's buffer plan of the step (arguments + outputs - donated + temporaries), per backbone.
  peak GiB: the device's `memory_stats()['peak_bytes_in_use']` so far in this process (GPU only; JAX
  cannot reset it, so it only grows down the table).
- The PyTorch peer (bench/torch_slow_resnet.py: Slow-only ResNet + action head, NCTHW, the same
  optimiser) runs after slow_r50 when torch with CUDA is present (torch.compile + bf16 autocast under
  --dtype=bfloat16), or on CPU with --torch_peer=on (eager, float32); 'ours/peer' is the clips/s ratio.

GPU options worth trying (none can be tried on the CPU-only development machine):
- --attention=cudnn: cuDNN flash attention in the video ViT (`jax.nn.dot_product_attention`).
- --remat=<jax.checkpoint_policies name>: recompute each transformer layer in the backward pass
  ('nothing_saveable' saves most memory; 'dots_with_no_batch_dims_saveable' keeps the matmul
  outputs), for a larger --batch. Only backbones with a `remat_policy` field (vit_b16) take it; the
  ResNets have none.
- --triton_gemm=false: cuBLAS instead of Triton for XLA's matmuls (--xla_gpu_enable_triton_gemm).
- --xla_flags='...': appended to XLA_FLAGS, e.g. '--xla_gpu_autotune_level=0' (faster compile),
  '--xla_gpu_enable_command_buffer=' (no CUDA graphs), '--xla_gpu_enable_latency_hiding_scheduler=true'.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time
import traceback

# JAX and PyTorch may share the GPU in this process: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax

from egoexo_jax.input import transforms
from egoexo_jax.models import backbones, egoexo

flags.DEFINE_list("backbones", None, "Backbones to time (names in BACKBONES); default all registered.")
flags.DEFINE_enum("size", None, ["small", "full"], "full networks at 224^2, or small (thin, 112^2) for a CPU; "
                  "default full on GPU, small otherwise.")
flags.DEFINE_integer("batch_size", None, "Clips per step; default 32 (full) or 2 (small).")
flags.DEFINE_alias("batch", "batch_size")  # the name of earlier commands
flags.DEFINE_integer("frames", None, "Clip length for every backbone; default per backbone (CLIP_FRAMES).")
flags.DEFINE_integer("crop", None, "Crop side; default 224 (full) or 112 (small).")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Compute dtype (parameters stay float32); default "
                  "bfloat16 on GPU, float32 otherwise.")
flags.DEFINE_integer("steps", None, "Timed steps; default 20 on GPU, 3 otherwise.")
flags.DEFINE_integer("warmup", None, "Untimed steps after compiling; default 3 on GPU, 1 otherwise.")
flags.DEFINE_enum("torch_peer", "auto", ["auto", "on", "off"], "PyTorch Slow-only peer after slow_r50; "
                  "auto: only where torch has CUDA.")
flags.DEFINE_string("remat", None, "jax.checkpoint_policies name for backbones with a remat_policy field.")
flags.DEFINE_enum("attention", None, ["xla", "cudnn"], "Attention implementation for backbones with an "
                  "attention_implementation field.")
flags.DEFINE_enum("triton_gemm", None, ["true", "false"], "Sets --xla_gpu_enable_triton_gemm.")
flags.DEFINE_string("xla_flags", "", "Extra XLA flags, appended to XLA_FLAGS before JAX starts a backend.")
flags.DEFINE_string("dump_dir", None, "Write each JAX step's optimised HLO (<backbone>.hlo.txt) and a profiler trace "
                    "of 3 steps (<dump_dir>/trace) here, to see which kernels take the time.")
FLAGS = flags.FLAGS

NUM_CLASSES = 400
# Frames per clip as each backbone is usually trained (what its first layer sees).
CLIP_FRAMES = {
    "slow_r50": 8, "slow_r101": 8,  # Slow-only 8x8
    "slowfast_r50": 32, "slowfast_r101": 32,  # the Fast pathway's 32 frames; Slow takes 8 of them
    "i3d_r50": 8, "r3d_50": 8, "tsm_r50": 8,  # 16 is also common: --frames=16
    "vit_b16": 8,  # 4 tubelets of 2 frames
}
DEFAULT_FRAMES = 8
# --size=small: argument overrides, applied where the backbone's module has the field.
SMALL_CONV_ARGS = dict(stage_blocks=(1, 1, 1, 1), width=16)
SMALL_TRANSFORMER_ARGS = dict(width=64, num_layers=2, num_heads=2, mlp_dim=256)
SLOW_R50_GMACS = 41.7  # Slow-only R50 8x8 at 224^2, forward (PySlowFast model zoo)
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM data sheets


# --------------------------------------------------------------------------- per-backbone set-up


def backbone_args(name: str, size: str) -> dict:
  """Overrides of the backbone's preset: thin ones for --size=small, plus the --remat/--attention options."""
  module, _ = backbones.BACKBONES[name]
  fields = module.__dataclass_fields__
  overrides = {}
  if size == "small":
    small = SMALL_TRANSFORMER_ARGS if "num_heads" in fields else SMALL_CONV_ARGS
    overrides = {k: v for k, v in small.items() if k in fields}
  if FLAGS.remat and "remat_policy" in fields:
    overrides["remat_policy"] = FLAGS.remat
  if FLAGS.attention and "attention_implementation" in fields:
    overrides["attention_implementation"] = FLAGS.attention
  return overrides


def video_vit_macs(args: dict, frames: int, crop: int) -> int:
  """Forward multiply-accumulates of VideoViT (+ action head) per clip: matmuls only."""
  _, preset = backbones.backbone_arguments("vit_b16", args)
  width, mlp, p, kt = preset["width"], preset["mlp_dim"], preset["patch_size"], preset["tubelet_frames"]
  tokens = (frames // kt) * (crop // p) ** 2
  per_layer = tokens * width * 4 * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp
  return tokens * kt * p * p * 3 * width + preset["num_layers"] * per_layer + width * NUM_CLASSES


def analytic_train_flops(name: str, args: dict, frames: int, crop: int, size: str) -> float | None:
  """3 x 2 x forward MACs per clip where the count is known, else None."""
  if name == "slow_r50" and size == "full" and frames == 8 and crop == 224 and not args:
    return 6 * SLOW_R50_GMACS * 1e9
  if name == "vit_b16":
    return 6.0 * video_vit_macs(args, frames, crop)
  return None


# --------------------------------------------------------------------------- JAX step


def build_jax(name: str, args: dict, frames: int, crop: int, batch: int, dtype: str):
  """(step(), info): the compiled train step of `name` on one device; info holds compile time, costs, memory."""
  model = egoexo.Model(num_classes=NUM_CLASSES, backbone=name, backbone_args=args, use_ego_heads=False,
                       dtype=jnp.dtype(dtype))
  optimizer = optax.sgd(0.01, momentum=0.9)
  rng = np.random.default_rng(0)
  clips = jax.device_put(rng.integers(0, 256, (batch, frames, crop, crop, 3), np.uint8))
  labels = jax.device_put(rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32))

  @jax.jit
  def init():
    variables = model.init(jax.random.key(0), jnp.zeros((1, frames, crop, crop, 3), jnp.float32), train=False)
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": variables.get("batch_stats", {}),
            "opt_state": optimizer.init(params)}

  def train_step(state, clips, labels):
    x = transforms.normalize_clips(clips, jnp.dtype(dtype))
    dropout_rng = jax.random.fold_in(jax.random.key(1), state["step"])

    def loss_fn(params):
      outputs, updates = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                                     rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(outputs["action"], labels).mean()
      return loss, updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats, "opt_state": opt_state}, loss

  state = init()
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
  tick = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, clips, labels).compile()
  compile_s = time.perf_counter() - tick
  if FLAGS.dump_dir:
    os.makedirs(FLAGS.dump_dir, exist_ok=True)
    pathlib.Path(FLAGS.dump_dir, f"{name}.hlo.txt").write_text(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  memory = compiled.memory_analysis()
  plan = None if memory is None else (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                      - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  carry = [state]

  def step():
    carry[0], loss = compiled(carry[0], clips, labels)
    jax.block_until_ready(loss)

  device = jax.devices()[0]
  info = {"compile_s": compile_s, "xla_flops": cost.get("flops"), "plan_bytes": plan, "params": num_params,
          "peak_bytes": lambda: (device.memory_stats() or {}).get("peak_bytes_in_use")}
  return step, info


# --------------------------------------------------------------------------- PyTorch peer


def build_torch_peer(args: dict, frames: int, crop: int, batch: int, dtype: str):
  """The PyTorch Slow-only ResNet step (CUDA: torch.compile, bf16 autocast when dtype is bfloat16)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_slow_resnet  # pylint: disable=g-import-not-at-top

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cuda = device.type == "cuda"
  autocast = cuda and dtype == "bfloat16"
  torch.manual_seed(0)
  if cuda:
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats(device)
  arch = torch_slow_resnet.resolved_arguments(*backbones.backbone_arguments("slow_r50", args))
  model = torch_slow_resnet.SlowResNet(arch["stage_blocks"], arch["width"], arch["temporal_kernels"],
                                       NUM_CLASSES).to(device).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  forward = torch.compile(model) if cuda else model
  clips = torch.randint(0, 256, (batch, 3, frames, crop, crop), dtype=torch.uint8, device=device)
  labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)

  step = torch_slow_resnet.make_train_step(forward, optimizer, clips, labels, mean=transforms.MEAN, std=transforms.STD,
                                           autocast=autocast)

  name = "torch " + ("compile" if cuda else "eager") + (" bf16" if autocast else " fp32")
  peak = (lambda: torch.cuda.max_memory_allocated(device)) if cuda else (lambda: None)
  return step, {"name": name, "compile_s": None, "compiles_on_first_call": cuda, "xla_flops": None,
                "plan_bytes": None, "params": sum(p.numel() for p in model.parameters()), "peak_bytes": peak}


def torch_has_cuda() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return torch.cuda.is_available()


# --------------------------------------------------------------------------- timing and table


def time_steps(step, info: dict, warmup: int, steps: int) -> dict:
  tick = time.perf_counter()
  step()
  if info.get("compiles_on_first_call"):
    info["compile_s"] = time.perf_counter() - tick
  for _ in range(warmup - 1):
    step()
  times = []
  for _ in range(steps):
    tick = time.perf_counter()
    step()
    times.append(time.perf_counter() - tick)
  return dict(info, median_s=statistics.median(times))


def gib(value) -> str:
  return "n/a" if not value else f"{value / 2**30:.2f}"


def main(argv):
  del argv
  # Before JAX starts a backend (nothing above has created an array): XLA reads XLA_FLAGS once, then.
  extra = ([f"--xla_gpu_enable_triton_gemm={FLAGS.triton_gemm}"] if FLAGS.triton_gemm else []) + FLAGS.xla_flags.split()
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()
  on_gpu = jax.default_backend() == "gpu"
  size = FLAGS.size or ("full" if on_gpu else "small")
  batch = FLAGS.batch_size or (32 if size == "full" else 2)
  crop = FLAGS.crop or (224 if size == "full" else 112)
  dtype = FLAGS.dtype or ("bfloat16" if on_gpu else "float32")
  steps, warmup = FLAGS.steps or (20 if on_gpu else 3), max(1, FLAGS.warmup or (3 if on_gpu else 1))
  names = FLAGS.backbones or list(backbones.BACKBONES)
  unknown = sorted(set(names) - set(backbones.BACKBONES))
  if unknown:
    raise app.UsageError(f"unknown backbones {unknown}; registered: {list(backbones.BACKBONES)}")
  device = jax.devices()[0]
  peak_tflops = next((v for chip, v in BF16_PEAK_TFLOPS.items() if chip in device.device_kind), None)
  peak_tflops = peak_tflops if on_gpu and dtype == "bfloat16" else None
  torch_peer = FLAGS.torch_peer == "on" or (FLAGS.torch_peer == "auto" and torch_has_cuda())

  print(f"device: {device.device_kind} ({jax.default_backend()}); --size={size}, batch {batch}, {crop}^2, {dtype}, "
        f"{steps} timed steps after {warmup} warm-up; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU cores")
  rows = []
  for name in names:
    frames = FLAGS.frames or CLIP_FRAMES.get(name, DEFAULT_FRAMES)
    args = backbone_args(name, size)
    print(f"{name}: clips ({batch}, {frames}, {crop}, {crop}, 3), backbone_args {args or 'preset'}", flush=True)
    runs = [(name, lambda: build_jax(name, args, frames, crop, batch, dtype))]
    if name == "slow_r50" and torch_peer:
      runs.append(("slow_r50 peer", lambda: build_torch_peer(args, frames, crop, batch, dtype)))
    analytic = analytic_train_flops(name, args, frames, crop, size)
    for label, build in runs:
      try:
        step, info = build()
        result = time_steps(step, info, warmup, steps)
        if FLAGS.dump_dir and label == name:
          with jax.profiler.trace(os.path.join(FLAGS.dump_dir, "trace")):
            for _ in range(3):
              step()
        del step
      except Exception as error:  # pylint: disable=broad-except
        traceback.print_exc()
        rows.append({"label": label, "frames": frames, "error": f"{type(error).__name__}: {error}"[:200]})
        continue
      xla = result["xla_flops"] / batch if result["xla_flops"] else None
      rows.append(dict(result, label=label, frames=frames, analytic=analytic, xla=xla, flops=analytic or xla,
                       clips_per_s=batch / result["median_s"], peak=result["peak_bytes"]()))
      print(f"  {label}: {1e3 * result['median_s']:.1f} ms/step, {batch / result['median_s']:.1f} clips/s", flush=True)

  print()
  header = (f"{'backbone':15} {'frames':>6} {'params M':>8} {'ms/step':>9} {'clips/s':>8} {'GFLOP an.':>9} "
            f"{'GFLOP xla':>9} {'MFU':>6} {'plan GiB':>8} {'peak GiB':>8} {'compile s':>9} {'ours/peer':>9}")
  print(header)
  print("-" * len(header))
  ours = {r["label"]: r["clips_per_s"] for r in rows if "error" not in r}
  for r in rows:
    if "error" in r:
      print(f"{r['label']:15} {r['frames']:6d}  FAILED: {r['error']}")
      continue
    analytic, xla = (f"{r[k] / 1e9:.2f}" if r[k] else "n/a" for k in ("analytic", "xla"))
    mfu = f"{100 * r['flops'] * r['clips_per_s'] / (peak_tflops * 1e12):.1f}%" if peak_tflops and r["flops"] else "n/a"
    compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    ratio = f"{ours['slow_r50'] / r['clips_per_s']:.2f}" if r["label"].endswith("peer") and "slow_r50" in ours else ""
    print(f"{r['label']:15} {r['frames']:6d} {r['params'] / 1e6:8.2f} {1e3 * r['median_s']:9.1f} "
          f"{r['clips_per_s']:8.1f} {analytic:>9} {xla:>9} {mfu:>6} "
          f"{gib(r['plan_bytes']):>8} {gib(r['peak']):>8} {compile_s:>9} {ratio:>9}")
  if not peak_tflops:
    print("MFU: only for bfloat16 on a GPU with a known peak (H100/H200: 989 TFLOP/s dense bf16)")
  print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU cores (other processes skew timings)")


if __name__ == "__main__":
  app.run(main)
