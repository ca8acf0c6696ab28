"""Test set-up: 8 fake CPU devices, so sharded code runs as on an 8-accelerator host."""
import os

# Must be set before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import io
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest
import torch
from torch import nn as tnn

import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT))  # configs/ import each other as `configs.<name>`, as under main.py


COMPILATION_CACHE = []  # the session's folder, once pytest_configure has made it


def pytest_configure(config):
  """One persistent XLA compilation cache per test session, in a fresh temporary folder removed when the session
  ends: the many end-to-end tests that build the same tiny train step (a few to ~30 s of compilation on 2 cores
  each), here and in the main.py subprocesses they start (which inherit the variables), compile each program
  once. A cache hit loads the executable XLA compiled for the identical program, so every result stays bit for
  bit the same. Nothing outlives the session: no test sees another session's executables. Made here, not at
  import: worker processes that import this file (Grain, multiprocessing) use the session's folder."""
  COMPILATION_CACHE.append(tempfile.mkdtemp(prefix="egoexo-jax-test-compilation-cache-"))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE[0]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"  # skips the many tiny eager-op programs
  jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE[0])  # jax is imported: set it here too
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_unconfigure(config):
  for folder in COMPILATION_CACHE:
    shutil.rmtree(folder, ignore_errors=True)


def decode_real_frames(name: str, count: int, short_side: int) -> list[np.ndarray]:
  """The first `count` frames of a shipped clip, decoded with PyAV and resized to `short_side`."""
  import av
  frames = []
  with av.open(str(DATA / "clips" / name)) as container:
    for frame in container.decode(video=0):
      scale = short_side / min(frame.width, frame.height)
      frames.append(frame.reformat(width=round(frame.width * scale), height=round(frame.height * scale),
                                   format="rgb24").to_ndarray())
      if len(frames) == count:
        break
  return frames


@pytest.fixture(scope="session")
def real_record_pattern(tmp_path_factory):
  """Six small records cut from two real clips, with teacher signals, as one TFRecord shard.

  Labels 0..2; 10-way object logits; hand boxes on every other frame, object boxes on all;
  record 5 carries no detector output (its interaction loss must be masked).
  """
  from PIL import Image
  from egoexo_jax.input import records

  rng = np.random.default_rng(0)
  out = tmp_path_factory.mktemp("records") / "real.tfrecord-00000-of-00001"
  clips = {name: decode_real_frames(name, 60, 72) for name in ("box.mp4", "cup.mp4")}
  with open(out, "wb") as f:
    for i in range(6):
      frames = clips["box.mp4" if i % 2 == 0 else "cup.mp4"][i * 5:i * 5 + 30]
      jpegs = []
      for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
      n = len(frames)
      hands = np.array([[t, .2, .3, .5, .7, .6 + .01 * t] for t in range(0, n, 2)], np.float32)
      objects = np.array([[t, .5, .4, .8, .9, .9] for t in range(n)] + [[0, 0, 0, .1, .1, .3]], np.float32)
      has_boxes = i != 5
      rec = records.VideoRecord(
          video_id=f"real_{i}", fps=25.0, height=frames[0].shape[0], width=frames[0].shape[1], frames=jpegs,
          labels=np.array([i % 3]), ego_logits=rng.normal(size=2).astype(np.float32),
          object_logits=rng.normal(size=10).astype(np.float32),
          hand_boxes=hands if has_boxes else None, object_boxes=objects if has_boxes else None)
      records.write_tfrecord(f, records.encode_example(rec))
  return str(out)


def tiny_config(record_pattern: str = "", **overrides):
  """configs/egoexo.py:small shrunk further for tests (a few seconds per compiled step)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("egoexo_config", DATA.parent / "configs" / "egoexo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("small")
  config.data.train_records = record_pattern
  config.data.clip_length = 4
  config.data.frame_stride = 2
  config.data.crop_size = 64
  config.data.min_short_side = 64
  config.data.max_short_side = 72
  config.data.num_workers = 0
  config.data.read_threads = 1
  config.model.num_classes = {"action": 3}
  config.model.num_object_classes = 10
  config.model.backbone_args.width = 8
  config.model.interaction_channels = 16
  config.global_batch_size = 8
  config.num_train_steps = 4
  config.optimizer.warmup_steps = 1
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.async_checkpointing = False
  return apply_overrides(config, overrides)


def model_grid(config) -> tuple[int, int, int]:
  """The (t, h, w) interaction-map grid the trainer gives `config`'s input pipeline: its objective's model's
  (objectives.egoexo.interaction_grid). Tests of the input layer alone pass a literal grid instead."""
  from egoexo_jax import objectives
  from egoexo_jax.objectives import egoexo
  return egoexo.interaction_grid(objectives.resolve(config).model, config)


def apply_overrides(config, overrides: dict):
  """Sets each dotted key of `overrides` ('data.clip_length') in `config`; returns `config`."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def assert_trees_close(a, b, rtol, atol):
  """Same tree structure, and every leaf close."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- PySlowFast's networks in torch.nn
# PySlowFast is not installed here; these have its module tree and state-dict names (weight import and
# export tests).


def bn3d(channels):
  return tnn.BatchNorm3d(channels, eps=1e-5, momentum=0.1)


class BottleneckTransform(tnn.Module):
  """PySlowFast resnet_helper.BottleneckTransform: a (kt x 1 x 1), b (1 x 3 x 3, strided), c (1 x 1 x 1)."""

  def __init__(self, dim_in, dim_out, inner, kt, stride):
    super().__init__()
    self.a = tnn.Conv3d(dim_in, inner, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
    self.a_bn = bn3d(inner)
    self.b = tnn.Conv3d(inner, inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
    self.b_bn = bn3d(inner)
    self.c = tnn.Conv3d(inner, dim_out, 1, bias=False)
    self.c_bn = bn3d(dim_out)

  def forward(self, x):
    x = torch.relu(self.a_bn(self.a(x)))
    x = torch.relu(self.b_bn(self.b(x)))
    return self.c_bn(self.c(x))


class ResBlock(tnn.Module):
  """PySlowFast resnet_helper.ResBlock: branch1 (projection, when needed) + branch2."""

  def __init__(self, dim_in, dim_out, inner, kt, stride):
    super().__init__()
    if dim_in != dim_out or stride != 1:
      self.branch1 = tnn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False)
      self.branch1_bn = bn3d(dim_out)
    self.branch2 = BottleneckTransform(dim_in, dim_out, inner, kt, stride)

  def forward(self, x):
    shortcut = self.branch1_bn(self.branch1(x)) if hasattr(self, "branch1") else x
    return torch.relu(shortcut + self.branch2(x))


class BasicStem(tnn.Module):
  """PySlowFast stem_helper.ResNetBasicStem: conv (kt, 7, 7) /2, BN, ReLU, max-pool (1, 3, 3) /2."""

  def __init__(self, dim_out, kt):
    super().__init__()
    self.conv = tnn.Conv3d(3, dim_out, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3), bias=False)
    self.bn = bn3d(dim_out)
    self.pool_layer = tnn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))

  def forward(self, x):
    return self.pool_layer(torch.relu(self.bn(self.conv(x))))


class FuseFastToSlow(tnn.Module):
  """PySlowFast video_model_builder.FuseFastToSlow."""

  def __init__(self, dim_in, kernel, alpha):
    super().__init__()
    self.conv_f2s = tnn.Conv3d(dim_in, 2 * dim_in, (kernel, 1, 1), stride=(alpha, 1, 1), padding=(kernel // 2, 0, 0),
                               bias=False)
    self.bn = bn3d(2 * dim_in)

  def forward(self, pathways):
    slow, fast = pathways
    return [torch.cat([slow, torch.relu(self.bn(self.conv_f2s(fast)))], 1), fast]


class PathwayModules(tnn.Module):
  """Holds 'pathway{p}_{name}' modules (PySlowFast's VideoModelStem and ResStage) and runs each pathway."""

  def __init__(self, name, modules_per_pathway):
    super().__init__()
    self.layout = [len(modules) for modules in modules_per_pathway]
    for p, modules in enumerate(modules_per_pathway):
      for i, module in enumerate(modules):
        self.add_module(f"pathway{p}_{name}" if name == "stem" else f"pathway{p}_{name}{i}", module)
    self.name = name

  def forward(self, pathways):
    out = []
    for p, x in enumerate(pathways):
      for i in range(self.layout[p]):
        x = getattr(self, f"pathway{p}_{self.name}" if self.name == "stem" else f"pathway{p}_{self.name}{i}")(x)
      out.append(x)
    return out


def resnet_stages(net: tnn.Module, pathways):
  """Stem, (SlowFast fusion,) res2-res5 of a net holding VideoResNet's modules -> res5 per pathway."""
  x = net.s1(pathways)
  for s in range(2, 6):
    if net.slowfast:
      x = getattr(net, f"s{s - 1}_fuse")(x)
    x = getattr(net, f"s{s}")(x)
    if s == 2 and hasattr(net, "pathway0_pool"):
      x = [net.pathway0_pool(x[0])]
  return x


class VideoResNet(tnn.Module):
  """PySlowFast's `ResNet` (Slow-only: one pathway; I3D with i3d=True) or `SlowFast` (two), with ResNetBasicHead's
  'head.projection', or with Ego-Exo's heads: MultiTaskHead 'head.projections.{0,1,2}' (action, ego,
  object) and HandObjHeadSingle 'handobjhead' on pathway 0. forward([slow, (fast)]) -> (outputs, res5)."""

  def __init__(self, blocks, num_classes, slowfast, width=64, fusion_kernel=7, alpha=4, beta_inv=8,
               egoexo_heads=False, interaction_channels=32, num_object_classes=12, i3d=False):
    super().__init__()
    widths = [width, width // beta_inv] if slowfast else [width]
    lateral = [2 * width // beta_inv * (1 if s == 0 else 2 * 2**s) for s in range(4)] if slowfast else [0] * 4
    self.s1 = PathwayModules("stem", [[BasicStem(w, kt)] for w, kt in zip(widths, (5 if i3d else 1, 5))])
    # PySlowFast _TEMPORAL_KERNEL_BASIS per stage: 'slow' / 'slowfast' (slow, fast) and 'i3d' (cycled over blocks).
    stage_kernels = ([([3],), ([3, 1],), ([3, 1],), ([1, 3],)] if i3d else
                     [([1], [3]), ([1], [3]), ([3], [3]), ([3], [3])])
    for s in range(4):
      stage = []
      for p, w in enumerate(widths):
        inner, dim_in = w * 2**s, (w if s == 0 else 2 * w * 2**s) + (lateral[s] if p == 0 else 0)
        kernels = stage_kernels[s][p]
        stage.append([ResBlock(dim_in if i == 0 else 4 * inner, 4 * inner, inner, kernels[i % len(kernels)],
                               (1 if s == 0 else 2) if i == 0 else 1) for i in range(blocks[s])])
      self.add_module(f"s{s + 2}", PathwayModules("res", stage))
      if slowfast:
        self.add_module(f"s{s + 1}_fuse", FuseFastToSlow(widths[1] * (1 if s == 0 else 2 * 2**s), fusion_kernel, alpha))
    if i3d:  # PySlowFast's temporal max-pool after s2 (_POOL1 'i3d' = [2, 1, 1]); no parameters
      self.pathway0_pool = tnn.MaxPool3d((2, 1, 1), (2, 1, 1), (0, 0, 0))
    self.slowfast = slowfast
    features = sum(32 * w for w in widths)
    if egoexo_heads:
      self.head = tnn.Module()
      self.head.projections = tnn.ModuleList([tnn.Linear(features, n) for n in (num_classes, 2, num_object_classes)])
      self.handobjhead = tnn.Module()
      self.handobjhead.pathway0_conv_fcn0 = tnn.Conv3d(32 * width, interaction_channels, (1, 3, 3), padding=(0, 1, 1))
      self.handobjhead.score_projection = tnn.Conv3d(interaction_channels, 2, 1)
    else:
      self.head = tnn.Module()
      self.head.projection = tnn.Linear(features, num_classes)

  def forward(self, pathways):
    x = resnet_stages(self, pathways)
    pooled = torch.cat([p.mean((2, 3, 4)) for p in x], 1)
    if hasattr(self.head, "projection"):
      return {"action": self.head.projection(pooled)}, x
    action, ego, obj = (projection(pooled) for projection in self.head.projections)
    interaction = self.handobjhead.score_projection(torch.relu(self.handobjhead.pathway0_conv_fcn0(x[0])))
    return {"action": action, "ego_score": ego, "object": obj, "interaction": interaction.permute(0, 2, 3, 4, 1)}, x


def randomize(model, seed=0):
  """Random weights (conv: PySlowFast's MSRA fill) and random BN affine parameters and running statistics.

  bn_c's gamma is kept small, as a trained network's last BN of a block tends to be, so that the
  activations stay O(1) through 16 residual blocks and the fp32 comparison is meaningful.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, tnn.Conv3d):
        fan_out = module.weight.shape[0] * np.prod(module.weight.shape[2:])
        module.weight.normal_(0, (2.0 / fan_out) ** 0.5, generator=generator)
        if module.bias is not None:
          module.bias.uniform_(-0.1, 0.1, generator=generator)
      elif isinstance(module, tnn.BatchNorm3d):
        module.weight.uniform_(*((0.1, 0.5) if name.endswith("c_bn") else (0.5, 1.5)), generator=generator)
        module.bias.uniform_(-0.2, 0.2, generator=generator)
        module.running_mean.uniform_(-0.2, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
      elif isinstance(module, tnn.Linear):
        module.weight.normal_(0, 0.05, generator=generator)
        module.bias.uniform_(-0.1, 0.1, generator=generator)
  return model.eval()


def pack_pathways(frames, slowfast, alpha=4):
  """PySlowFast's pack_pathway_output: (B, 3, T, H, W) -> [slow (every alpha-th by linspace), fast]."""
  if not slowfast:
    return [frames]
  index = torch.linspace(0, frames.shape[2] - 1, frames.shape[2] // alpha).long()
  return [torch.index_select(frames, 2, index), frames]


# --------------------------------------------------------------------------- synthetic runs (export tests)


def random_variables(shapes, seed=0):
  """Concrete variables for a tree of ShapeDtypeStructs: kernels He-normal, BatchNorm scales, biases and
  running statistics random (bn_c's scale small, as randomize() does), other leaves normal(0, 0.02)."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    names = [getattr(k, "key", "") for k in path]
    size = shape.shape
    if names[-1] == "kernel":
      value = rng.normal(size=size) * np.sqrt(2.0 / np.prod(size[:-1]))
    elif names[-1] == "scale":
      value = rng.uniform(*((0.1, 0.5) if "bn_c" in names else (0.5, 1.5)), size=size)
    elif names[-1] in ("bias", "mean"):
      value = rng.uniform(-0.2, 0.2, size=size)
    elif names[-1] == "var":
      value = rng.uniform(0.5, 2.0, size=size)
    else:
      value = rng.normal(0, 0.02, size=size)
    return np.asarray(value, shape.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def write_checkpoint(workdir, variables, step=7):
  """`workdir` with a checkpoint in the trainer's layout (state: step, params, batch_stats and an
  optimiser-sized opt_state) added, as if a run had saved it at `step`."""
  import jax.numpy as jnp
  from egoexo_jax import checkpointing
  state = {"step": jnp.asarray(step, jnp.int32), "params": variables["params"],
           "batch_stats": variables.get("batch_stats", {}), "opt_state": {"momentum": variables["params"]}}
  manager = checkpointing.make_manager(str(workdir), max_to_keep=10, async_save=False)
  checkpointing.save(manager, step, jax.tree.map(jnp.asarray, state))
  manager.wait_until_finished()
  manager.close()
  return str(workdir)
