"""Fine-tuning inputs: training clips with multi-label or per-head labels, and multi-view test clips.

Label layouts (`config.data.multi_label`, `config.data.label_layout`, `config.model.num_classes`):
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

from egoexo_jax.input import pipelines, records, transforms


def head_sizes(config) -> tuple[tuple[str, int], ...]:
  """(head name, classes) in the order of `config.data.label_layout` (default: a single 'action' head), the
  sizes from `config.model.num_classes` (an int: the single head's size)."""
  layout = tuple(config.data.get("label_layout", ()) or ("action",))
  sizes = config.model.num_classes
  sizes = {"action": sizes} if isinstance(sizes, int) else dict(sizes)
  if sorted(layout) != sorted(sizes):
    raise ValueError(f"config data.label_layout {layout} and model.num_classes {sorted(sizes)} name different heads")
  multi_label = bool(config.data.get("multi_label", False))
  if multi_label and len(layout) != 1:
    raise ValueError(f"config data.multi_label needs exactly one head; data.label_layout is {layout}")
  return tuple((name, int(sizes[name])) for name in layout)


@dataclasses.dataclass(frozen=True)
class FinetuneTrainTransform(grain.transforms.RandomMap):
  """VideoRecord -> one training example of fixed shapes.

  Output: 'clips' uint8 (T, S, S, 3); 'labels' float32 (K,) K-hot (multi-label) or int32 (H,) (per-head);
  with `interaction`, also 'interaction_map' float32 (t, h, w, 2) and the 0/1 mask 'has_interaction'.
  """

  heads: tuple[tuple[str, int], ...]
  multi_label: bool
  clip_length: int = 8
  frame_stride: int = 8
  crop_size: int = 224
  min_short_side: int = 256
  max_short_side: int = 320
  interaction: bool = False
  feature_grid: tuple[int, int, int] = (8, 7, 7)
  box_score_threshold: float = 0.5
  target_fps: float = 0.0  # transforms.sample_frame_indices: 0 strides over stored frames
  interaction_frames: str = "max"  # transforms.interaction_time_steps
  label_intervals: dict | None = dataclasses.field(default=None, hash=False, compare=False)

  def check(self, record: records.VideoRecord) -> None:
    """Raises ConfigMismatchError when the record's labels do not fit the heads, it has no label
    intervals (when used) or, with `interaction`, a box field holds an invalid row."""
    record_labels(record, self.heads, self.multi_label)
    if self.multi_label and self.label_intervals is not None and record.video_id not in self.label_intervals:
      raise pipelines.ConfigMismatchError(f"record '{record.video_id}' has no entry in config.data.label_intervals")
    if self.interaction:
      pipelines.check_boxes(record)

  def random_map(self, record: records.VideoRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if self.interaction:
      pipelines.check_boxes(record)
    indices = transforms.sample_frame_indices(record.num_frames, self.clip_length, self.frame_stride, rng,
                                              fps=record.fps, target_fps=self.target_fps)
    window = transforms.sample_crop_window(record.height, record.width, self.crop_size, self.min_short_side,
                                           self.max_short_side, rng)
    example = {"clips": transforms.decode_and_crop(record.frames, indices, window),
               "labels": self.clip_labels(record, indices)}
    if self.interaction:
      maps = [transforms.boxes_to_map(b, indices, record.height, record.width, window, self.feature_grid,
                                      self.box_score_threshold, self.interaction_frames)
              for b in (record.hand_boxes, record.object_boxes)]
      example["interaction_map"] = np.stack(maps, axis=-1)
      example["has_interaction"] = np.float32(record.hand_boxes is not None or record.object_boxes is not None)
    return example

  def clip_labels(self, record: records.VideoRecord, indices: np.ndarray) -> np.ndarray:
    """The target of a clip made of frames `indices` of `record` (see the module docstring)."""
    labels = record_labels(record, self.heads, self.multi_label)
    if not self.multi_label or self.label_intervals is None:
      return labels
    if record.video_id not in self.label_intervals:
      raise pipelines.ConfigMismatchError(
          f"record '{record.video_id}' has no entry in config.data.label_intervals")
    first, last = indices[0] / record.fps, indices[-1] / record.fps
    target = np.zeros_like(labels)
    for label, start, end in self.label_intervals[record.video_id]:
      if start <= last and end >= first:
        target[int(label)] = 1.0
    return target


def record_labels(record: records.VideoRecord, heads: tuple[tuple[str, int], ...], multi_label: bool) -> np.ndarray:
  """A record's video-level target: K-hot float32 (K,) for multi-label, int32 (H,) per head."""
  labels = [int(x) for x in record.labels]
  if multi_label:
    (_, num_classes), = heads
    if any(not 0 <= x < num_classes for x in labels):
      raise pipelines.ConfigMismatchError(
          f"record '{record.video_id}': labels {labels} are not all in [0, {num_classes}) (config model.num_classes)")
    target = np.zeros(num_classes, np.float32)
    target[labels] = 1.0
    return target
  if len(labels) != len(heads):
    raise pipelines.ConfigMismatchError(
        f"record '{record.video_id}': field 'labels' holds {labels}, but the config has {len(heads)} heads "
        f"{[h for h, _ in heads]} (one class per head, in that order)")
  offset, per_head = 0, []
  for (head, size), label in zip(heads, labels):
    if not offset <= label < offset + size:
      raise pipelines.ConfigMismatchError(
          f"record '{record.video_id}': {head} label {label} is outside [{offset}, {offset + size}), the {head} "
          "classes of the concatenated class space (config data.label_layout, model.num_classes)")
    per_head.append(label - offset)
    offset += size
  return np.asarray(per_head, np.int32)


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


def finetune_transform(config) -> FinetuneTrainTransform:
  """The train transform from a config's `data`, `model` and `loss` sections."""
  data = config.data
  interaction = bool(config.model.get("use_interaction_head", False))
  intervals = data.get("label_intervals", "")
  return FinetuneTrainTransform(
      heads=head_sizes(config), multi_label=bool(data.multi_label), clip_length=data.clip_length,
      frame_stride=data.frame_stride, crop_size=data.crop_size, min_short_side=data.min_short_side,
      max_short_side=data.max_short_side, interaction=interaction,
      feature_grid=tuple(pipelines.feature_grid(config)) if interaction else (1, 1, 1),
      box_score_threshold=data.box_score_threshold, target_fps=float(data.get("target_fps", 0.0)),
      interaction_frames=data.get("interaction_frames", "max"),
      label_intervals=load_intervals(intervals) if intervals else None)


def make_train_dataset(config, record_pattern: str, *, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The per-host fine-tuning stream of batches of `global_batch_size / process_count` examples."""
  return pipelines.batched_stream(config, pipelines.open_train_records(config, record_pattern),
                                  finetune_transform(config),
                                  process_index=process_index, process_count=process_count)


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

  heads: tuple[tuple[str, int], ...]
  multi_label: bool
  view_args: tuple[tuple[str, object], ...]  # keyword arguments of multi_view_clips

  def map(self, record: records.VideoRecord) -> dict:
    return {"video_id": record.video_id, "views": multi_view_clips(record, **dict(self.view_args)),
            "labels": record_labels(record, self.heads, self.multi_label)}
