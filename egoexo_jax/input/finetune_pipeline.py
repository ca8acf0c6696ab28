"""Fine-tuning inputs: training clips with multi-label or per-head labels, and multi-view test clips.

Label layouts (`config.data.label_kind`, `config.data.label_layout`, `config.model.num_classes`):
  multi-label (Charades-Ego): a record's `labels` are class ids of one head; the target is K-hot
      (K,) float32. With `config.data.label_intervals` ({video_id: [[class, start_s, end_s], ...]},
      written by `egoexo_jax.input.annotations`), a training clip's target holds only the classes whose
      interval overlaps the clip's span [t_first, t_last] (t = frame index / fps), as the Ego-Exo /
      PySlowFast Charades loader labels a clip by the union of its frames' labels.
  per-head (EPIC-Kitchens [verb, noun], Kinetics [action]): labels[i] is the class of head
      `config.data.label_layout[i]` as an id of the concatenated class space (head i's classes follow
      those of heads 0..i-1: EPIC-100 stores [verb, 97 + noun], see annotations.py); the target is the
      (H,) int32 class per head, offsets removed.

Test views follow PySlowFast's test loader: the clip is scaled to short side S_test, and 3 square
crops of S_test are taken at the left/centre/right (top/centre/bottom for portrait frames); N clips
are placed either as the Kinetics loader does (start_i = floor(delta i / N),
`transforms.evenly_spaced_clips`) or as the Ego-Exo Charades/EPIC loaders do ('spread':
start_i = round(delta i / (N - 1))), delta = max(num_frames - span, 0).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import grain
import numpy as np
from PIL import Image

from egoexo_jax.input import labels, records, stream, transforms
from egoexo_jax.input.clip_sampler import BoxRasterizer, ClipSampler, box_rasterizer, check_boxes, clip_sampler
from egoexo_jax.input.stream import ConfigMismatchError


def head_sizes(config) -> labels.Heads:
  """(head name, classes) in the order of `config.data.label_layout` (default: a single 'action' head), the
  sizes from `config.model.num_classes` (an int: the single head's size)."""
  heads = labels.head_sizes(config.model.num_classes, tuple(config.data.get("label_layout", ()) or ("action",)),
                            key="model.num_classes", layout_key="data.label_layout")
  if label_kind(config) == "multi_label" and len(heads) != 1:
    raise ValueError(f"config data.label_kind 'multi_label' needs exactly one head; data.label_layout is "
                     f"{[h for h, _ in heads]}")
  return heads


def label_kind(config) -> str:
  """config data.label_kind: 'single' (a class per head) or 'multi_label' (labels.LABEL_KINDS)."""
  kind = config.data.label_kind
  if kind not in labels.LABEL_KINDS:
    raise ValueError(f"config data.label_kind is '{kind}': use one of {labels.LABEL_KINDS}")
  return kind


def record_labels(record: records.VideoRecord, heads: labels.Heads, kind: str) -> np.ndarray:
  """A record's video-level target (labels.encode_labels): K-hot float32 (K,) for 'multi_label', int32 (H,)
  per head for 'single' (ids of the concatenated class space, offsets removed)."""
  return labels.encode_labels(record.labels, heads, kind, f"record '{record.video_id}'", concatenated_ids=True)


@dataclasses.dataclass(frozen=True)
class FinetuneTrainTransform(grain.transforms.RandomMap):
  """VideoRecord -> one training example of fixed shapes.

  Output: 'clips' uint8 (T, S, S, 3); 'labels' float32 (K,) K-hot (multi-label) or int32 (H,) (per-head);
  with `maps`, also 'interaction_map' float32 (t, h, w, 2) and the 0/1 mask 'has_interaction'.
  """

  heads: labels.Heads
  kind: str  # labels.LABEL_KINDS
  clip: ClipSampler = ClipSampler()
  maps: BoxRasterizer | None = None  # Ego-Exo*: the interaction maps too
  label_intervals: dict | None = dataclasses.field(default=None, hash=False, compare=False)

  def check(self, record: records.VideoRecord) -> None:
    """Raises ConfigMismatchError when the record's labels do not fit the heads, it has no label
    intervals (when used) or, with `maps`, a box field holds an invalid row."""
    record_labels(record, self.heads, self.kind)
    if self.kind == "multi_label" and self.label_intervals is not None and record.video_id not in self.label_intervals:
      raise ConfigMismatchError(f"record '{record.video_id}' has no entry in config.data.label_intervals")
    if self.maps:
      check_boxes(record)

  def random_map(self, record: records.VideoRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if self.maps:
      check_boxes(record)
    clip = self.clip.sample(record, rng)
    example = {**clip.fields("clips"), "labels": self.clip_labels(record, clip.indices)}
    if self.maps:
      example.update(self.maps(record, clip))
    return example

  def clip_labels(self, record: records.VideoRecord, indices: np.ndarray) -> np.ndarray:
    """The target of a clip made of frames `indices` of `record` (see the module docstring)."""
    target = record_labels(record, self.heads, self.kind)
    if self.kind != "multi_label" or self.label_intervals is None:
      return target
    if record.video_id not in self.label_intervals:
      raise ConfigMismatchError(f"record '{record.video_id}' has no entry in config.data.label_intervals")
    first, last = indices[0] / record.fps, indices[-1] / record.fps
    target = np.zeros_like(target)
    for label, start, end in self.label_intervals[record.video_id]:
      if start <= last and end >= first:
        target[int(label)] = 1.0
    return target


def load_intervals(path: str) -> dict[str, np.ndarray]:
  """`{video_id: [[class, start_s, end_s], ...]}` JSON -> {video_id: float64 (N, 3)}."""
  with open(path, encoding="utf-8") as f:
    table = json.load(f)
  out = {}
  for video_id, rows in table.items():
    array = np.asarray(rows, np.float64).reshape(-1, 3)
    if len(array) and (array[:, 0].min() < 0 or np.any(array[:, 2] < array[:, 1])):
      raise ValueError(f"{path}: intervals of '{video_id}' need class >= 0 and start <= end")
    out[video_id] = array
  return out


def finetune_transform(config, grid: tuple[int, int, int] | None) -> FinetuneTrainTransform:
  """The train transform from a config's `data` and `model` sections; `grid` is the (t, h, w) grid of the
  model's interaction map (objectives.egoexo.interaction_grid), needed with model.use_interaction_head and
  unused (may be None) without it."""
  data = config.data
  maps = None
  if config.model.get("use_interaction_head", False):
    if grid is None:
      raise ValueError("model.use_interaction_head draws interaction maps: pass the model's (t, h, w) grid")
    maps = box_rasterizer(config, grid)
  intervals = data.get("label_intervals", "")
  return FinetuneTrainTransform(heads=head_sizes(config), kind=label_kind(config), clip=clip_sampler(config),
                                maps=maps, label_intervals=load_intervals(intervals) if intervals else None)


def make_train_dataset(config, record_pattern: str, *, grid: tuple[int, int, int] | None, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The per-host fine-tuning stream of batches of `global_batch_size / process_count` examples; `grid` as
  in finetune_transform."""
  return stream.batched_stream(config, stream.open_train_records(config, record_pattern),
                               finetune_transform(config, grid), process_index=process_index,
                               process_count=process_count)


# --------------------------------------------------------------------------- test views


def spread_clip_starts(num_frames: int, clip_length: int, stride: int, num_clips: int) -> np.ndarray:
  """Frame indices (num_clips, clip_length) as the Ego-Exo Charades/EPIC test loaders place clips:
  start_i = round(delta i / (N - 1)) (Python's round), delta = max(num_frames - span, 0)."""
  span = (clip_length - 1) * stride + 1
  gap = max(num_frames - span, 0) / max(num_clips - 1, 1)
  starts = np.array([int(round(gap * i)) for i in range(num_clips)])
  return np.clip(starts[:, None] + stride * np.arange(clip_length)[None], 0, num_frames - 1)


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(height, width) after PySlowFast's short-side scaling: the long side is floor(long * S / short)."""
  if width < height:
    return int(math.floor(height / width * short_side)), short_side
  return short_side, int(math.floor(width / height * short_side))


def uniform_crop_offset(height: int, width: int, size: int, spatial_index: int) -> tuple[int, int]:
  """(y, x) of PySlowFast's uniform_crop: centre = ceil((dim - size) / 2); index 0 / 2 take the start / end
  of the long side (left / right for landscape frames, top / bottom for portrait)."""
  y, x = int(math.ceil((height - size) / 2)), int(math.ceil((width - size) / 2))
  if height > width:
    y = {0: 0, 1: y, 2: height - size}[spatial_index]
  else:
    x = {0: 0, 1: x, 2: width - size}[spatial_index]
  return y, x


def multi_view_clips(record: records.VideoRecord, *, clip_length: int, frame_stride: int, num_clips: int,
               num_crops: int, short_side: int, crop_size: int, placement: str = "spread") -> np.ndarray:
  """uint8 (num_clips * num_crops, T, crop, crop, 3); view v = clip v // num_crops, crop v % num_crops.

  Each distinct frame is decoded once and scaled to the test size; crops are slices of it.
  """
  if placement == "spread":
    clips = spread_clip_starts(record.num_frames, clip_length, frame_stride, num_clips)
  elif placement == "kinetics":
    clips = transforms.evenly_spaced_clips(record.num_frames, clip_length, frame_stride, num_clips)
  else:
    raise ValueError(f"unknown clip placement '{placement}': use 'spread' or 'kinetics'")
  if num_crops not in (1, 3):
    raise ValueError(f"num_crops is {num_crops}; PySlowFast's uniform crops are 1 (centre) or 3")
  height, width = scaled_size(record.height, record.width, short_side)
  if crop_size > min(height, width):
    raise ValueError(f"test crop {crop_size} is larger than the scaled frame {height}x{width}")
  decoded = {}
  for index in np.unique(clips):
    with Image.open(io.BytesIO(record.frames[int(index)])) as image:
      decoded[int(index)] = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))
  crops = [1] if num_crops == 1 else [0, 1, 2]
  views = np.empty((len(clips) * num_crops, clip_length, crop_size, crop_size, 3), np.uint8)
  for c, clip in enumerate(clips):
    frames = np.stack([decoded[int(i)] for i in clip])
    for k, spatial_index in enumerate(crops):
      y, x = uniform_crop_offset(height, width, crop_size, spatial_index)
      views[c * num_crops + k] = frames[:, y:y + crop_size, x:x + crop_size]
  return views


@dataclasses.dataclass(frozen=True)
class MultiViewTransform(grain.transforms.Map):
  """VideoRecord -> {'video_id': str, 'views': uint8 (V, T, S, S, 3), 'labels': target}; no randomness."""

  heads: labels.Heads
  multi_label: bool
  view_args: tuple[tuple[str, object], ...]  # keyword arguments of multi_view_clips

  def map(self, record: records.VideoRecord) -> dict:
    return {"video_id": record.video_id, "views": multi_view_clips(record, **dict(self.view_args)),
            "labels": record_labels(record, self.heads, "multi_label" if self.multi_label else "single")}
