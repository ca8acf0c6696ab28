"""One clip sampler and one box rasterizer for every clip pipeline (Ego-Exo, fine-tuning, SUM-L).

ClipSampler: a VideoRecord -> a clip of `clip_length` frames: the frame indices
(transforms.sample_frame_indices: a random start, or the centre with rng None), the crop window
(transforms.sample_crop_window: short-side jitter, a random square, a random flip; centre and no flip with rng
None) and the decoded pixels (transforms.decode_and_crop), drawn from `rng` in that order. With resize
'device' (config data.resize; device_resize.resolve) training clips leave the host uncut and unresized, as a
patch around the window plus the window, and the trainer resizes them on the accelerator (device_resize.py);
`Clip.fields` gives a transform the batch keys either way, and calling the sampler always gives the finished
clip.
BoxRasterizer: a record's hand and object boxes -> the interaction maps of a sampled clip on the
backbone's (t, h, w) grid (transforms.boxes_to_map, Ego-Exo Eq. 5), moved through the clip's window.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from egoexo_jax.input import device_resize, records, transforms
from egoexo_jax.input.stream import ConfigMismatchError


@dataclasses.dataclass(frozen=True)
class Clip:
  pixels: np.ndarray  # uint8 (T, S, S, 3), or (T, P, P, 3) patches with patch_window (device_resize.py)
  indices: np.ndarray  # (T,) the stored frames it shows
  window: transforms.CropWindow  # in stored-frame pixels
  patch_window: np.ndarray | None = None  # float32 (5,): the window in the patch, when resized on device

  def fields(self, key: str) -> dict[str, np.ndarray]:
    """The example's entries for this clip under batch key `key` (and '<key>_window' for a patch)."""
    if self.patch_window is None:
      return {key: self.pixels}
    return {key: self.pixels, device_resize.window_key(key): self.patch_window}


@dataclasses.dataclass(frozen=True)
class ClipSampler:
  """VideoRecord -> Clip (module docstring); `target_fps` 0 strides over the stored frames."""

  clip_length: int = 8
  frame_stride: int = 8
  crop_size: int = 224
  min_short_side: int = 256
  max_short_side: int = 320
  target_fps: float = 0.0
  decoder: str = transforms.DEFAULT_DECODER  # transforms.decode_and_crop: 'fast' | 'exact' (config data.decoder)
  resize: str = "host"  # 'device': the fast decoder's clips are resized by the trainer (config data.resize)

  @property
  def sends_patches(self) -> bool:
    """Whether training clips leave as patches for the trainer to resize (device_resize.py)."""
    return self.resize == "device" and self.decoder == "fast"

  def sample(self, record: records.VideoRecord, rng: np.random.Generator | None, *,
             finished: bool = False) -> Clip:
    """The clip of `record` drawn from `rng`; a patch for the device to resize (resize 'device' with the fast
    decoder) unless `finished`."""
    indices = transforms.sample_frame_indices(record.num_frames, self.clip_length, self.frame_stride, rng,
                                              fps=record.fps, target_fps=self.target_fps)
    window = transforms.sample_crop_window(record.height, record.width, self.crop_size, self.min_short_side,
                                           self.max_short_side, rng)
    if self.sends_patches and not finished:
      patch, patch_window = device_resize.decode_patch(record.frames, indices, window)
      return Clip(patch, indices, window, patch_window)
    return Clip(transforms.decode_and_crop(record.frames, indices, window, self.decoder), indices, window)

  def __call__(self, record: records.VideoRecord, rng: np.random.Generator | None) -> np.ndarray:
    """The finished clip's pixels only (evaluation and the other callers that apply no trainer)."""
    return self.sample(record, rng, finished=True).pixels


def clip_sampler(config) -> ClipSampler:
  """The sampler of a config's `data` section."""
  data = config.data
  resize = device_resize.resolve(data.get("resize", "auto"))
  return ClipSampler(data.clip_length, data.frame_stride, data.crop_size, data.min_short_side,
                     data.max_short_side, float(data.get("target_fps", 0.0)),
                     data.get("decoder", transforms.DEFAULT_DECODER), resize)


@dataclasses.dataclass(frozen=True)
class BoxRasterizer:
  """(record, clip) -> {'interaction_map': float32 (t, h, w, 2), channels (hand, object);
  'has_interaction': 1.0 when the record carries detector output, else 0.0 (its maps are all zeros)}."""

  grid: tuple[int, int, int] = (8, 7, 7)
  score_threshold: float = 0.5
  frames: str = "max"  # transforms.interaction_time_steps

  def __call__(self, record: records.VideoRecord, clip: Clip) -> dict[str, np.ndarray]:
    maps = [transforms.boxes_to_map(boxes, clip.indices, record.height, record.width, clip.window, self.grid,
                                    self.score_threshold, self.frames)
            for boxes in (record.hand_boxes, record.object_boxes)]
    return {"interaction_map": np.stack(maps, axis=-1),
            "has_interaction": np.float32(record.hand_boxes is not None or record.object_boxes is not None)}


def box_rasterizer(config, grid: tuple[int, int, int]) -> BoxRasterizer:
  """The rasterizer of a config's `data` section onto the model's map grid `grid`."""
  data = config.data
  return BoxRasterizer(tuple(grid), data.box_score_threshold, data.get("interaction_frames", "max"))


def check_boxes(record: records.VideoRecord) -> None:
  """Raises ConfigMismatchError when a box field of `record` holds an invalid row (records.box_problem):
  such rows would become wrong map targets (a score of 50, an inverted box drawn as 'no hands')."""
  for key in ("hand_boxes", "object_boxes"):
    boxes = getattr(record, key)
    problem = None if boxes is None else records.box_problem(boxes)
    if problem:
      raise ConfigMismatchError(f"record '{record.video_id}': field '{key}': {problem}")
