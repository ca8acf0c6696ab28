"""The Ego-Exo pre-training pipeline: records with teacher signals -> training examples, per host.

  records -> stream.batched_stream (seed, global shuffle, repeat, skip unreadable records, host rows,
  batches, workers) around EgoExoTrainTransform: one clip (clip_sampler.ClipSampler: random start, scale
  jitter, crop, flip), its action label (labels.encode_labels, one 'single' head), the teacher signals the
  record carries (Ego-Score and Object-Score logits) and the interaction maps drawn from its boxes
  (clip_sampler.BoxRasterizer) on the model's (t, h, w) grid.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from egoexo_jax.input import labels, records, stream
from egoexo_jax.input.clip_sampler import BoxRasterizer, ClipSampler, box_rasterizer, check_boxes, clip_sampler
from egoexo_jax.input.stream import ConfigMismatchError


@dataclasses.dataclass(frozen=True)
class EgoExoTrainTransform(grain.transforms.RandomMap):
  """VideoRecord -> one training example of fixed shapes.

  Output: 'clips' uint8 (T, S, S, 3); 'labels' int32; 'ego_score_logits' (2,) (the Ego-Score teacher,
  the record's field 'ego_logits') and 'object_logits' (K,) float32; 'interaction_map' float32
  (t, h, w, 2) with channels (hand, object); 0/1 float masks 'has_ego_score', 'has_object',
  'has_interaction' saying which teacher signals the record carries.
  """

  heads: labels.Heads  # one head: the action classes
  num_object_classes: int
  clip: ClipSampler = ClipSampler()
  maps: BoxRasterizer = BoxRasterizer()

  def random_map(self, record: records.VideoRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self.apply(record, rng)

  def check(self, record: records.VideoRecord) -> None:
    """Raises ConfigMismatchError naming the record and field when its content does not fit the config:
    one label in [0, num_classes), teacher vectors of the configured lengths and finite, valid boxes."""
    self._label(record)
    for key, size in (("ego_logits", 2), ("object_logits", self.num_object_classes)):
      signal = getattr(record, key)
      if signal is None:
        continue
      if signal.shape != (size,):
        raise ConfigMismatchError(
            f"record '{record.video_id}': field '{key}' has {signal.size} values but the config expects {size}")
      if not np.all(np.isfinite(signal)):
        raise ConfigMismatchError(f"record '{record.video_id}': field '{key}' holds non-finite values")
    check_boxes(record)

  def apply(self, record: records.VideoRecord, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """The transform itself; rng None gives the deterministic centre clip used for evaluation."""
    self.check(record)
    clip = self.clip.sample(record, rng)
    example = {**clip.fields("clips"), "labels": self._label(record)}
    for key, mask_key, size, signal in (
        ("ego_score_logits", "has_ego_score", 2, record.ego_logits),
        ("object_logits", "has_object", self.num_object_classes, record.object_logits)):
      if signal is None:
        example[key], example[mask_key] = np.zeros(size, np.float32), np.float32(0)
      else:
        example[key], example[mask_key] = signal.astype(np.float32), np.float32(1)
    example.update(self.maps(record, clip))
    return example

  def _label(self, record: records.VideoRecord) -> np.int32:
    return labels.encode_labels(record.labels, self.heads, "single", f"record '{record.video_id}'")[0]


def action_heads(config) -> labels.Heads:
  """The one action head of config model.num_classes (an int, or {name: classes})."""
  heads = labels.head_sizes(config.model.num_classes, key="model.num_classes", layout_key="data.label_layout")
  if len(heads) != 1:
    raise ValueError(f"config model.num_classes {dict(heads)}: Ego-Exo pre-training has one action head")
  return heads


def egoexo_transform(config, grid: tuple[int, int, int]) -> EgoExoTrainTransform:
  """The train transform from a config's `data` and `model` sections; `grid` is the (t, h, w) grid of the
  model's interaction map, which the objective computes from its model (objectives.egoexo.interaction_grid)."""
  return EgoExoTrainTransform(heads=action_heads(config), num_object_classes=config.model.num_object_classes,
                              clip=clip_sampler(config), maps=box_rasterizer(config, grid))


def make_train_dataset(config, record_pattern: str, *, grid: tuple[int, int, int], process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The per-host Ego-Exo training stream of batches of `global_batch_size / process_count` examples, with
  the interaction maps drawn on the model's (t, h, w) `grid` (egoexo_transform)."""
  return stream.batched_stream(config, stream.open_train_records(config, record_pattern),
                               egoexo_transform(config, grid), process_index=process_index,
                               process_count=process_count)
