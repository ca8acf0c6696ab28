"""Test set-up: 8 fake CPU devices, so sharded code runs as on an 8-accelerator host."""
import os

# Must be set before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import io
import pathlib

import jax
import numpy as np
import pytest

import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT))  # configs/ import each other as `configs.<name>`, as under main.py


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
  config.model.num_classes = 3
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
