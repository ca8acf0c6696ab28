"""Helpers shared by several test files (conftest.py holds the fixtures and the PyTorch references).

Test files import from here instead of from each other: configs at test size, NumPy references of the
SUM-L losses and of bilinear resampling, record files with unreadable or unfitting records, and main.py run in its own session.
"""

import dataclasses
import importlib.util
import io
import os
import subprocess
import sys
import time

import numpy as np
import psutil
from PIL import Image

from conftest import ROOT
from egoexo_jax.input import records, sources


def load_config(name, arg):
  """configs/<name>.py's get_config(arg), loaded from the file."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --------------------------------------------------------------------------- fine-tuning configs at test size

# Command-line form of tiny_finetune_config's sizes, for the CLI tests.
TINY_FLAGS = ["--config.data.clip_length=4", "--config.data.frame_stride=2", "--config.data.crop_size=64",
              "--config.data.min_short_side=64", "--config.data.max_short_side=72", "--config.data.num_workers=0",
              "--config.data.read_threads=1", "--config.data.convert_short_side=72",
              "--config.model.backbone_args.width=8", "--config.model.interaction_channels=16",
              "--config.eval.short_side=64", "--config.eval.crop_size=64", "--config.eval.batch_size=24"]


def tiny_finetune_config(name: str = "finetune_epic100", arg: str = "small", **overrides):
  """configs/<name>.py:<arg> at the sizes of conftest.tiny_config (the same backbone, so it can start from it)."""
  config = load_config(name, arg)
  for flag in TINY_FLAGS:
    key, value = flag[len("--config."):].split("=")
    node, *path = config, *key.split(".")
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = type(node[path[-1]])(value)
  config.num_train_steps = 3
  if config.optimizer.schedule == "steps":
    config.optimizer.decay_steps = (1, 2)
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  config.async_checkpointing = False
  for key, value in overrides.items():
    node, *path = config, *key.split(".")
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = value
  return config


# --------------------------------------------------------------------------- NumPy references of the SUM-L losses


def np_normalize(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_logsumexp(values):
  values = np.asarray(values, np.float64)
  return values.max() + np.log(np.exp(values - values.max()).sum())


def np_info_nce(a, p, tau, mask=None):
  """Eq. 2-3 written out row by row."""
  a, p = a.astype(np.float64), p.astype(np.float64)
  rows = range(len(a)) if mask is None else np.flatnonzero(mask)
  per_anchor = [np_logsumexp([a[i] @ p[j] / tau for j in rows]) - a[i] @ p[i] / tau for i in rows]
  return np.mean(per_anchor) if per_anchor else 0.0


def np_decoupled(a, p, tau, mask=None, w=None):
  """Eq. 6 (DCL) written out row by row: negatives are the other rows of both views."""
  a, p = a.astype(np.float64), p.astype(np.float64)
  rows = list(range(len(a)) if mask is None else np.flatnonzero(mask))
  per_anchor = []
  for i in rows:
    negatives = [a[i] @ a[j] / tau for j in rows if j != i] + [a[i] @ p[j] / tau for j in rows if j != i]
    if negatives:
      per_anchor.append(-(1.0 if w is None else w[i]) * a[i] @ p[i] / tau + np_logsumexp(negatives))
  return np.mean(per_anchor) if per_anchor else 0.0


def np_semantic_weights(d_f, d_t, sigma, mask):
  e = np.exp((d_f.astype(np.float64) * d_t).sum(1) / sigma)
  return np.where(mask > 0, e / e[mask > 0].mean(), 0.0)


def np_semantic_alignment(z_f, z_t, d_f, d_t, tau, sigma, threshold, min_pairs=2):
  """Eq. 8-10: select pairs by narration similarity, weight, decoupled InfoNCE both ways."""
  selected = ((d_f.astype(np.float64) * d_t).sum(1) > threshold).astype(np.float64)
  if selected.sum() < min_pairs:
    return 0.0, selected.sum()
  w = np_semantic_weights(d_f, d_t, sigma, selected)
  return np_decoupled(z_f, z_t, tau, selected, w) + np_decoupled(z_t, z_f, tau, selected, w), selected.sum()


def np_decoupled_cross_view(a, p, tau, mask=None, w=None):
  """Eq. 4/6 as written: the denominator sums the other view's non-positive rows only."""
  a, p = a.astype(np.float64), p.astype(np.float64)
  rows = list(range(len(a)) if mask is None else np.flatnonzero(mask))
  per_anchor = [-(1.0 if w is None else w[i]) * a[i] @ p[i] / tau
                + np.log(sum(np.exp(a[i] @ p[j] / tau) for j in rows if j != i)) for i in rows if len(rows) > 1]
  return np.mean(per_anchor) if per_anchor else 0.0


# --------------------------------------------------------------------------- record files that fail to read or fit


def write_records_with_corrupt_ones(real_pattern: str, path, with_real: bool = True) -> dict[int, str]:
  """The six real records, then record 6 (a copy of real_1 whose JPEG frames are garbage) and record 7
  (a copy of real_2 whose payload has a flipped byte: CRC mismatch). Returns {index: why unreadable}.
  with_real False: only the two unreadable records."""
  real = [sources.open_records(real_pattern)[i] for i in range(6)]
  broken_jpeg = dataclasses.replace(real[1], video_id="broken_jpeg", frames=[b"\xff\xd8 not a jpeg"] * real[1].num_frames)
  with open(path, "wb") as f:
    for record in (real if with_real else []) + [broken_jpeg]:
      records.write_tfrecord(f, records.encode_example(record))
    start = f.tell()
    records.write_tfrecord(f, records.encode_example(dataclasses.replace(real[2], video_id="bad_crc")))
  data = bytearray(open(path, "rb").read())
  data[start + 12 + 40] ^= 0xFF  # a byte inside record 7's payload (after its 12-byte header)
  open(path, "wb").write(bytes(data))
  return {6: "cannot decode", 7: "data CRC mismatch"} if with_real else {0: "cannot decode", 1: "data CRC mismatch"}


def expected_positions(num_records: int, unreadable, seed: int, count: int) -> list[tuple[int, int]]:
  """(record index, records skipped) of the first `count` examples of the global stream, by the rule:
  position p takes the first readable record at positions p, p + 1, ... of the shuffled order."""
  import grain  # pylint: disable=g-import-not-at-top
  order = grain.MapDataset.source(range(num_records)).seed(seed).shuffle().repeat()
  out = []
  for p in range(count):
    q = p
    while order[q] in unreadable:
      q += 1
    out.append((order[q], q - p))
  return out


def write_records_with_bad_content(real_pattern: str, path) -> dict[int, str]:
  """The six real records, then four readable records whose content fails the transform's check:
  6 a label outside [0, 3), 7 a NaN hand-box coordinate, 8 object logits of length 7 (not 10), 9 an inverted
  object box. Returns {index: what the skip message says}."""
  real = [sources.open_records(real_pattern)[i] for i in range(6)]
  nan_box = real[1].hand_boxes.copy()
  nan_box[1, 3] = np.nan
  inverted = real[3].object_boxes.copy()
  inverted[2, [1, 3]] = inverted[2, [3, 1]]
  bad = [dataclasses.replace(real[0], video_id="bad_label", labels=np.array([99])),
         dataclasses.replace(real[1], video_id="nan_box", hand_boxes=nan_box),
         dataclasses.replace(real[2], video_id="short_logits", object_logits=np.zeros(7, np.float32)),
         dataclasses.replace(real[3], video_id="inverted_box", object_boxes=inverted)]
  with open(path, "wb") as f:
    for record in real + bad:
      records.write_tfrecord(f, records.encode_example(record))
  return {6: "label 99 of head 0 is outside [0, 3)", 7: "field 'hand_boxes': box row 1 (frame 2) has a non-finite value",
          8: "field 'object_logits' has 7 values but the config expects 10",
          9: "field 'object_boxes': box row 2 (frame 2) is inverted"}


# --------------------------------------------------------------------------- main.py in its own session


def flatten(tree, prefix=""):
  """{'a.b': value} for the scalar leaves of a nested dict (tuples are left out)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    elif not isinstance(v, (tuple, list)):
      out[f"{prefix}{k}"] = v
  return out


def override_flags(config) -> list[str]:
  """--config.x=y flags that turn configs/egoexo.py:small into `config`."""
  spec = importlib.util.spec_from_file_location("egoexo_config", ROOT / "configs" / "egoexo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  small = flatten(module.get_config("small").to_dict())
  return [f"--config.{k}={v}" for k, v in flatten(config.to_dict()).items() if small.get(k) != v]


def start_main(config, workdir, **popen) -> subprocess.Popen:
  """main.py with `config` (as --config.x flags over configs/egoexo.py:small), in its own session."""
  return subprocess.Popen([sys.executable, "main.py", "--config=configs/egoexo.py:small", f"--workdir={workdir}",
                           "--alsologtostderr", *override_flags(config)], cwd=ROOT, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, start_new_session=True, **popen)


def session_processes(session: int) -> list[psutil.Process]:
  """The live processes of a session (a trainer started with start_new_session and all it started)."""
  found = []
  for p in psutil.process_iter():
    try:
      if os.getsid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
        found.append(p)
    except (OSError, psutil.Error):
      pass
  return found


def wait_until_gone(session: int, timeout_s: float = 15.0) -> list[psutil.Process]:
  """Waits for the session's processes to end; returns those still alive after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while (left := session_processes(session)) and time.monotonic() < deadline:
    time.sleep(0.2)
  return left


# --------------------------------------------------------------------------- JPEG frames and bilinear windows


def jpeg(array, quality=90):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=quality)  # the converter's encoder and quality
  return buf.getvalue()


def bilinear(image, window):
  """Reference: output pixel centre (x + 0.5) maps to x0 + (x + 0.5) * w / size in stored pixels, whose
  centres sit at integer + 0.5; taps beyond the frame take the edge pixel; flip mirrors the columns."""
  height, width = image.shape[:2]

  def taps(lo, hi, n):
    pos = lo + (np.arange(window.size) + 0.5) * (hi - lo) / window.size - 0.5
    left = np.floor(pos).astype(int)
    frac = pos - left
    return np.clip(left, 0, n - 1), np.clip(left + 1, 0, n - 1), frac

  x_left, x_right, fx = taps(window.x0, window.x1, width)
  y_top, y_bottom, fy = taps(window.y0, window.y1, height)
  image = image.astype(np.float64)
  rows = image[y_top] * (1 - fy)[:, None, None] + image[y_bottom] * fy[:, None, None]
  out = rows[:, x_left] * (1 - fx)[None, :, None] + rows[:, x_right] * fx[None, :, None]
  return out[:, ::-1] if window.flip else out
