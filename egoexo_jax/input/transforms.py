"""Per-example clip transforms: temporal sampling, scale jitter, crop, flip, and box -> map.

All functions are plain NumPy/PIL on one example, so they run inside Grain worker processes
and are testable by hand. Geometry is done once: the crop window is computed in stored-frame
pixels and each frame is resampled straight from that window to the output size (one PIL
resize per frame, no intermediate full-size image), and the same window maps the boxes.
Clips stay uint8 until the accelerator; the mean/std normalisation happens on device
(`normalize_clips`), which sends 4x fewer bytes from host to device.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

MEAN = 0.45
STD = 0.225


@dataclasses.dataclass(frozen=True)
class CropWindow:
  """A crop of the stored frames, in their pixels, resampled to `size` x `size` output pixels."""

  x0: float
  y0: float
  x1: float
  y1: float
  size: int
  flip: bool


def sample_frame_indices(num_frames: int, clip_length: int, stride: int, rng: np.random.Generator | None) -> np.ndarray:
  """`clip_length` frame indices `stride` apart, from a random start (centre when rng is None).

  Videos shorter than the clip's span repeat their last frame, as PySlowFast does.
  """
  span = (clip_length - 1) * stride + 1
  slack = max(num_frames - span, 0)
  start = slack // 2 if rng is None else int(rng.integers(0, slack + 1))
  return np.minimum(start + stride * np.arange(clip_length), num_frames - 1)


def evenly_spaced_clips(num_frames: int, clip_length: int, stride: int, num_clips: int) -> np.ndarray:
  """Frame indices (num_clips, clip_length) of test-time clips, as PySlowFast places them.

  Clip i of N starts at floor(delta * i / N), delta = max(num_frames - span, 0); short videos
  repeat their last frame.
  """
  span = (clip_length - 1) * stride + 1
  delta = max(num_frames - span, 0)
  starts = (delta * np.arange(num_clips)) // num_clips
  return np.minimum(starts[:, None] + stride * np.arange(clip_length)[None], num_frames - 1)


def sample_crop_window(height: int, width: int, crop_size: int, min_short_side: int, max_short_side: int,
                       rng: np.random.Generator | None, flip_probability: float = 0.5) -> CropWindow:
  """Short-side scale jitter in [min, max], then a random crop_size square, then a random flip.

  With rng None: short side `min_short_side`, centre crop, no flip (evaluation).
  """
  short_side = min_short_side if rng is None else int(rng.integers(min_short_side, max_short_side + 1))
  if short_side < crop_size:
    raise ValueError(f"short side {short_side} is smaller than the crop {crop_size}")
  scale = short_side / min(height, width)  # output pixels per stored pixel
  scaled_h, scaled_w = height * scale, width * scale
  if rng is None:
    off_y, off_x, flip = (scaled_h - crop_size) / 2, (scaled_w - crop_size) / 2, False
  else:
    off_y = rng.uniform(0, scaled_h - crop_size)
    off_x = rng.uniform(0, scaled_w - crop_size)
    flip = bool(rng.uniform() < flip_probability)
  return CropWindow(x0=off_x / scale, y0=off_y / scale, x1=(off_x + crop_size) / scale,
                    y1=(off_y + crop_size) / scale, size=crop_size, flip=flip)


def decode_and_crop(jpeg_frames: list[bytes], indices: np.ndarray, window: CropWindow) -> np.ndarray:
  """Decodes the chosen JPEG frames and resamples the window: uint8 (T, size, size, 3)."""
  out = np.empty((len(indices), window.size, window.size, 3), np.uint8)
  box = (window.x0, window.y0, window.x1, window.y1)
  cache = {}
  for t, index in enumerate(indices):
    index = int(index)
    if index not in cache:  # short videos repeat frames
      with Image.open(io.BytesIO(jpeg_frames[index])) as image:
        cache[index] = np.asarray(image.convert("RGB").resize((window.size, window.size), Image.BILINEAR, box=box))
    out[t] = cache[index]
  if window.flip:
    out = out[:, :, ::-1]
  return out


def boxes_to_map(boxes: np.ndarray, indices: np.ndarray, height: int, width: int, window: CropWindow,
                 grid: tuple[int, int, int], score_threshold: float = 0.5) -> np.ndarray:
  """Rasterises detector boxes onto the backbone's output grid (Ego-Exo Eq. 5): float32 (t, h, w).

  boxes: (N, 6) rows (frame, x1, y1, x2, y2, score), coordinates normalised to the stored frame.
  A sampled frame `indices[k]` feeds output time step `k * t // T`. Boxes under the threshold are
  dropped; each box is moved through the crop window and flip, and every grid cell it touches
  takes the highest score among the boxes touching it. Cells are touched as in Ego-Exo's own
  code (corners floored onto the grid, both ends inclusive); unlike it, a box wholly outside
  the crop is dropped rather than clamped onto the border cells.
  """
  grid_t, grid_h, grid_w = grid
  out = np.zeros(grid, np.float32)
  if boxes is None or len(boxes) == 0:
    return out
  boxes = boxes[boxes[:, 5] >= score_threshold]
  crop_w, crop_h = window.x1 - window.x0, window.y1 - window.y0
  for k, frame in enumerate(indices):
    t = k * grid_t // len(indices)
    for _, x1, y1, x2, y2, score in boxes[boxes[:, 0] == frame]:
      # stored-frame pixels -> [0, 1] of the crop
      u1, u2 = (x1 * width - window.x0) / crop_w, (x2 * width - window.x0) / crop_w
      v1, v2 = (y1 * height - window.y0) / crop_h, (y2 * height - window.y0) / crop_h
      if window.flip:
        u1, u2 = 1.0 - u2, 1.0 - u1
      if u2 <= 0 or v2 <= 0 or u1 >= 1 or v1 >= 1:
        continue
      c1, c2 = (int(np.floor(np.clip(u, 0, 1) * grid_w)) for u in (u1, u2))
      r1, r2 = (int(np.floor(np.clip(v, 0, 1) * grid_h)) for v in (v1, v2))
      c2, r2 = min(c2, grid_w - 1), min(r2, grid_h - 1)
      cells = out[t, r1:r2 + 1, c1:c2 + 1]
      np.maximum(cells, score, out=cells)
  return out


def normalize_clips(clips, dtype):
  """uint8 clips -> (x / 255 - mean) / std in `dtype`; runs on device inside the jitted step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return ((clips.astype(jnp.float32) / 255.0 - MEAN) / STD).astype(dtype)
