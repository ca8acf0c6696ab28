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

from egoexo_jax.input import jpeg_decode

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


def _resampled_span(clip_length: int, stride: int, fps: float, target_fps: float) -> float:
  """Stored frames spanned by a clip of `clip_length` x `stride` frames at `target_fps` (PySlowFast's
  clip_size = sampling_rate x num_frames / target_fps x fps, slowfast/datasets/decoder.py)."""
  if not fps > 0:
    raise ValueError(f"clip sampling at target_fps {target_fps} needs the video's fps (the record says {fps})")
  return stride * clip_length * fps / target_fps


def _linspace_clip(start: float, span: float, clip_length: int, num_frames: int) -> np.ndarray:
  """PySlowFast's temporal_sampling: linspace(start, start + span - 1, T), clamped to the video, truncated."""
  index = np.linspace(start, start + span - 1, clip_length)
  return np.clip(index, 0, num_frames - 1).astype(np.int64)


def sample_frame_indices(num_frames: int, clip_length: int, stride: int, rng: np.random.Generator | None,
                         fps: float = 0.0, target_fps: float = 0.0) -> np.ndarray:
  """The frame indices of one clip, from a random start (centre when rng is None).

  target_fps 0: `clip_length` stored frames `stride` apart. target_fps > 0 (PySlowFast's decoder, which
  the released Ego-Exo pre-training used at 30): the video is treated as resampled to target_fps, so the
  clip covers span = clip_length x stride x fps / target_fps stored frames from a start drawn uniformly in
  [0, num_frames - span], and its frames sit at floor(linspace(start, start + span - 1, clip_length)).
  Videos shorter than the clip's span repeat their last frame, as PySlowFast does.
  """
  if target_fps > 0:
    span = _resampled_span(clip_length, stride, fps, target_fps)
    delta = max(num_frames - span, 0.0)
    start = delta / 2 if rng is None else float(rng.uniform(0, delta))
    return _linspace_clip(start, span, clip_length, num_frames)
  span = (clip_length - 1) * stride + 1
  slack = max(num_frames - span, 0)
  start = slack // 2 if rng is None else int(rng.integers(0, slack + 1))
  return np.minimum(start + stride * np.arange(clip_length), num_frames - 1)


def evenly_spaced_clips(num_frames: int, clip_length: int, stride: int, num_clips: int, fps: float = 0.0,
                        target_fps: float = 0.0) -> np.ndarray:
  """Frame indices (num_clips, clip_length) of test-time clips, as PySlowFast places them.

  Clip i of N starts at floor(delta * i / N), delta = max(num_frames - span, 0); short videos
  repeat their last frame. With target_fps > 0 the clips are those of sample_frame_indices, starting at
  delta * i / N (PySlowFast's get_start_end_idx).
  """
  if target_fps > 0:
    span = _resampled_span(clip_length, stride, fps, target_fps)
    delta = max(num_frames - span, 0.0)
    return np.stack([_linspace_clip(delta * i / num_clips, span, clip_length, num_frames) for i in range(num_clips)])
  span = (clip_length - 1) * stride + 1
  delta = max(num_frames - span, 0)
  starts = (delta * np.arange(num_clips)) // num_clips
  return np.minimum(starts[:, None] + stride * np.arange(clip_length)[None], num_frames - 1)


INTERACTION_FRAMES = ("slow_frames", "max")


def interaction_time_steps(clip_length: int, grid_t: int, mode: str = "max") -> list[tuple[int, int]]:
  """(clip frame k, map time step) pairs: which sampled frames draw their boxes onto which step of a map
  grid of grid_t steps (boxes_to_map).

  'max': frame k feeds step k * grid_t // clip_length (all frames; a step takes the max over its group).
  'slow_frames': step j takes only frame floor(linspace(0, clip_length - 1, grid_t))[j], as the released
  code builds the targets on the 32 fast frames of SlowFast and keeps the slow pathway's (torch.linspace(0,
  T - 1, slow_T).long() in slowfast/models/handobj_models.py: frames 0, 4, 8, 13, 17, 22, 26, 31 of 32).
  Both are the identity when clip_length == grid_t (Slow-only).
  """
  if mode == "max":
    return [(k, k * grid_t // clip_length) for k in range(clip_length)]
  if mode == "slow_frames":
    frames = np.floor(np.linspace(0, clip_length - 1, grid_t)).astype(np.int64)
    return [(int(k), j) for j, k in enumerate(frames)]
  raise ValueError(f"unknown interaction_frames '{mode}': use one of {INTERACTION_FRAMES}")


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


DECODERS = ("fast", "exact")
DEFAULT_DECODER = "fast"


def decode_and_crop(jpeg_frames: list[bytes], indices: np.ndarray, window: CropWindow,
                    decoder: str = DEFAULT_DECODER) -> np.ndarray:
  """Decodes the chosen JPEG frames and resamples the window: uint8 (T, size, size, 3).

  decoder 'fast' (jpeg_decode.py: libjpeg-turbo through simplejpeg, DCT-domain reduction where the
  window allows, OpenCV's bilinear warp straight into the output) or 'exact' (Pillow: one
  resize(box, BILINEAR) per frame, the path of runs made before the fast one; bit for bit as they were).
  The two agree within rounding of the bilinear interpolation for magnified windows
  (tests/jpeg_decode_test.py measures how far apart they are on real frames). Frames that are not JPEG
  take the exact path under either decoder.
  """
  if decoder == "fast":
    if jpeg_frames[int(indices[0])][:2] == b"\xff\xd8":  # a JPEG start-of-image marker
      return jpeg_decode.decode_and_crop(jpeg_frames, indices, window)
    decoder = "exact"  # frames of another format Pillow reads (PNG in tests), or not an image: Pillow says which
  if decoder != "exact":
    raise ValueError(f"unknown decoder '{decoder}' (config data.decoder): use one of {DECODERS}")
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
                 grid: tuple[int, int, int], score_threshold: float = 0.5, frames: str = "max") -> np.ndarray:
  """Rasterises detector boxes onto the backbone's output grid (Ego-Exo Eq. 5): float32 (t, h, w).

  boxes: (N, 6) rows (frame, x1, y1, x2, y2, score), coordinates normalised to the stored frame.
  Sampled frame `indices[k]` feeds the time steps interaction_time_steps(T, t, frames) gives it ('max':
  step `k * t // T`; 'slow_frames': the slow pathway's frames only). Boxes under the threshold are
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
  for k, t in interaction_time_steps(len(indices), grid_t, frames):
    for _, x1, y1, x2, y2, score in boxes[boxes[:, 0] == indices[k]]:
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
