"""Grain pipelines that turn record shards into training batches.

The Ego-Exo train pipeline, per host:

  records (TFRecord/ArrayRecord, random access)
    -> seed + global shuffle (a new permutation every epoch) -> repeat
    -> EgoExoTrainTransform (random: clip start, scale jitter, crop, flip; boxes -> maps)
       + 'record_index' (the record's index in the sorted shards)
    -> skip unreadable records ('skipped_records': how many were passed over for this example)
    -> this host's rows of each global batch (HostRowsDataset)
    -> batch(per-host batch) -> worker processes (mp_prefetch)

Every random choice comes from the per-element RNG that Grain derives from the seed and the
element's index in the global stream (the host split comes after the transform, and a host computes
only its own elements), so the global stream is the same for any number of workers or hosts: global
batch k is elements [kB, (k+1)B) in this order whatever the topology, host h holding rows
[h B/P, (h+1) B/P) of it (the rows its devices hold, as jax.devices() is ordered by process). An iterator restored from a checkpointed state
continues with exactly the batches the interrupted run would have seen.

A record that cannot be read or decoded (CRC mismatch, a broken tf.Example, a corrupt JPEG), or whose
content fails the transform's `check` (a label out of range, teacher logits of the wrong length, a NaN
or inverted box: ConfigMismatchError), is logged with its file, record number, index and id and
replaced by the next element of the stream; the count rides in the example as 'skipped_records' and
the trainer logs train/skipped_records. So a bad record met days into a run costs one warning, also
after a resume, never the run. When the stream is built, `check_sample` runs the same check on a
bounded sample (`data.check_records`, default 32: the first records of shards spread over the set)
and stops when none of them fits the config (a systematic mismatch, e.g. num_classes), before any
step. 'record_index' and 'skipped_records' stay on the host (HOST_KEYS); the trainer pops them before
the device put.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import numpy as np
from absl import logging

from egoexo_jax import processes
from egoexo_jax.input import records, sources, transforms


class ConfigMismatchError(ValueError):
  """A record whose contents do not fit the config or the format's rules (label range, teacher vector
  length, non-finite teacher values, invalid boxes). In a training stream such a record is skipped
  like an unreadable one; a dataset whose sampled records all fail is an error when it is opened."""


@dataclasses.dataclass(frozen=True)
class EgoExoTrainTransform(grain.transforms.RandomMap):
  """VideoRecord -> one training example of fixed shapes.

  Output: 'clips' uint8 (T, S, S, 3); 'label' int32; 'ego_logits' (2,) and 'object_logits' (K,)
  float32; 'interaction_map' float32 (t, h, w, 2) with channels (hand, object); 0/1 float masks
  'has_ego', 'has_object', 'has_interaction' saying which teacher signals the record carries.
  """

  num_classes: int
  num_object_classes: int
  clip_length: int = 8
  frame_stride: int = 8
  crop_size: int = 224
  min_short_side: int = 256
  max_short_side: int = 320
  feature_grid: tuple[int, int, int] = (8, 7, 7)
  box_score_threshold: float = 0.5
  target_fps: float = 0.0  # transforms.sample_frame_indices: 0 strides over stored frames
  interaction_frames: str = "max"  # transforms.interaction_time_steps
  decoder: str = transforms.DEFAULT_DECODER  # transforms.decode_and_crop: 'fast' | 'exact'

  def random_map(self, record: records.VideoRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self.apply(record, rng)

  def check(self, record: records.VideoRecord) -> None:
    """Raises ConfigMismatchError naming the record and field when its content does not fit the config:
    one label in [0, num_classes), teacher vectors of the configured lengths and finite, valid boxes."""
    self._single_label(record)
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
    indices = transforms.sample_frame_indices(record.num_frames, self.clip_length, self.frame_stride, rng,
                                              fps=record.fps, target_fps=self.target_fps)
    window = transforms.sample_crop_window(record.height, record.width, self.crop_size, self.min_short_side,
                                           self.max_short_side, rng)
    example = {
        "clips": transforms.decode_and_crop(record.frames, indices, window, self.decoder),
        "label": np.int32(self._single_label(record)),
    }
    for key, size, signal in (("ego_logits", 2, record.ego_logits),
                              ("object_logits", self.num_object_classes, record.object_logits)):
      mask_key = "has_" + key.split("_")[0]
      if signal is None:
        example[key], example[mask_key] = np.zeros(size, np.float32), np.float32(0)
      else:
        example[key], example[mask_key] = signal.astype(np.float32), np.float32(1)
    has_boxes = record.hand_boxes is not None or record.object_boxes is not None
    maps = [transforms.boxes_to_map(b, indices, record.height, record.width, window, self.feature_grid,
                                    self.box_score_threshold, self.interaction_frames)
            for b in (record.hand_boxes, record.object_boxes)]
    example["interaction_map"] = np.stack(maps, axis=-1)
    example["has_interaction"] = np.float32(has_boxes)
    return example

  def _single_label(self, record: records.VideoRecord) -> int:
    if len(record.labels) != 1:
      raise ConfigMismatchError(
          f"record '{record.video_id}': field 'labels' holds {list(record.labels)}; "
          "Ego-Exo pre-training needs exactly one action label per video")
    label = int(record.labels[0])
    if not 0 <= label < self.num_classes:
      raise ConfigMismatchError(
          f"record '{record.video_id}': label {label} is outside [0, {self.num_classes}) (config model.num_classes)")
    return label


def check_boxes(record: records.VideoRecord) -> None:
  """Raises ConfigMismatchError when a box field of `record` holds an invalid row (records.box_problem):
  such rows would become wrong map targets (a score of 50, an inverted box drawn as 'no hands')."""
  for key in ("hand_boxes", "object_boxes"):
    boxes = getattr(record, key)
    problem = None if boxes is None else records.box_problem(boxes)
    if problem:
      raise ConfigMismatchError(f"record '{record.video_id}': field '{key}': {problem}")


def feature_grid(config) -> tuple[int, int, int]:
  """The (t, h, w) grid of the backbone's pathway 0 for the configured clip, which the interaction
  maps are drawn on (Slow-only R50 at 8 x 224^2: (8, 7, 7); SlowFast: the slow pathway's T / alpha).
  Computed by tracing shapes only (jax.eval_shape), so it always agrees with the model."""
  import jax  # pylint: disable=g-import-not-at-top
  from egoexo_jax.models import backbones  # pylint: disable=g-import-not-at-top

  data = config.data
  backbone = backbones.build_backbone(config.model.backbone, config.model.get("backbone_args"), name=None)
  clips = jax.ShapeDtypeStruct((1, data.clip_length, data.crop_size, data.crop_size, 3), "float32")
  pathways, _ = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x, train=False), clips)
  return tuple(int(n) for n in pathways[0].shape[1:4])


def egoexo_transform(config, grid: tuple[int, int, int] | None = None) -> EgoExoTrainTransform:
  """The train transform from a config's `data` and `model` sections; `grid` (default: feature_grid)
  is the (t, h, w) grid of the model's interaction map."""
  data, model = config.data, config.model
  return EgoExoTrainTransform(
      num_classes=model.num_classes,
      num_object_classes=model.num_object_classes,
      clip_length=data.clip_length,
      frame_stride=data.frame_stride,
      crop_size=data.crop_size,
      min_short_side=data.min_short_side,
      max_short_side=data.max_short_side,
      feature_grid=tuple(grid or feature_grid(config)),
      box_score_threshold=data.box_score_threshold,
      target_fps=float(data.get("target_fps", 0.0)),
      interaction_frames=data.get("interaction_frames", "max"),
      decoder=data.get("decoder", transforms.DEFAULT_DECODER),
  )


def prepare_records(config, workdir: str) -> str:
  """The record glob to train on; converts the embedded manifest into the workdir when none is set.

  Process 0 converts (once: a finished conversion leaves `<prefix>.json`); other processes wait.
  """
  if config.data.train_records:
    return config.data.train_records
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  prefix = os.path.join(workdir, "records", "train")
  if jax.process_index() == 0 and not os.path.exists(prefix + ".json"):
    from egoexo_jax.input import convert  # pylint: disable=g-import-not-at-top  (PyAV only when converting)

    logging.info("Converting %s into %s (short side %d).", config.data.manifest, prefix,
                 config.data.convert_short_side)
    report = convert.convert_manifest(
        config.data.manifest, prefix, short_side=config.data.convert_short_side,
        ego_logits=config.data.ego_logits or None, object_logits=config.data.object_logits or None,
        hand_object_dir=config.data.hand_object_dir or None, workers=max(1, config.data.num_workers))
    logging.info("Converted %d videos (%d skipped).", report.written, len(report.skipped))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("prepare_records")
  return prefix + ".tfrecord-*"


# --------------------------------------------------------------------------- record ids and unreadable records

RECORD_INDEX = "record_index"  # int64: the example's record, as an index into the sorted shards
SKIPPED_RECORDS = "skipped_records"  # int32: unreadable records passed over to make this example
HOST_KEYS = (RECORD_INDEX, SKIPPED_RECORDS)  # batch keys the trainer keeps on the host
MAX_CONSECUTIVE_UNREADABLE = 100  # more in a row than this is a broken dataset, not a few bad records


class UnreadableRecordError(records.RecordError):
  """A record that cannot be read or decoded; `record_index` is its index in the source."""

  def __init__(self, message: str, record_index: int):
    super().__init__(message)
    self.record_index = record_index


class IndexedSource:
  """A random-access source whose items are (index, item), so the index survives shuffling.

  Read errors (records.RecordError: CRC mismatch, broken tf.Example) become UnreadableRecordError.
  """

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def where(self, index: int) -> str:
    return self.source.where(index) if hasattr(self.source, "where") else f"record {index} of {self.source!r}"

  def describe(self, index: int) -> str:
    """'file#n (id ...)' of a record, for messages; reads the record."""
    try:
      record_id = getattr(self.source[index], "video_id", None)
    except Exception as e:  # pylint: disable=broad-except  (a message must not fail on a bad record)
      record_id = f"unreadable: {type(e).__name__}"
    return f"{self.where(index)} (id {record_id!r})"

  def __getitem__(self, index: int):
    try:
      return index, self.source[index]
    except records.RecordError as e:
      raise UnreadableRecordError(f"{e} (record index {index})", index) from e

  def __repr__(self) -> str:
    return f"IndexedSource({self.source!r})"


@dataclasses.dataclass(frozen=True)
class IndexedTransform(grain.transforms.RandomMap):
  """Applies `transform` to the item of an (index, item) pair and adds RECORD_INDEX to the example.

  A decode failure in the transform (a corrupt JPEG: PIL's OSError; a RecordError of another source the
  transform reads) becomes UnreadableRecordError naming the record's file, number, index and id.
  """

  transform: Any
  source: IndexedSource

  def random_map(self, element, rng: np.random.Generator):
    index, record = element
    apply = getattr(self.transform, "random_map", self.transform)
    try:
      example = apply(record, rng)
    except (records.RecordError, OSError, SyntaxError, ConfigMismatchError) as e:
      record_id = getattr(record, "video_id", None)
      what = "does not fit" if isinstance(e, ConfigMismatchError) else "cannot decode"
      raise UnreadableRecordError(f"{self.source.where(index)} (record index {index}"
                                  f"{f', id {record_id!r}' if record_id else ''}): {what}: "
                                  f"{type(e).__name__}: {e}", index) from e
    example[RECORD_INDEX] = np.int64(index)
    return example


class SkipUnreadableDataset(grain.MapDataset):
  """Element i of `parent`, or if that record is unreadable the next readable one (i + 1, i + 2, ...).

  Logs each skipped record and sets SKIPPED_RECORDS in the example to the number passed over. Lives on
  the global stream (before the host slice), so the stream stays the same for any number of hosts.
  More than MAX_CONSECUTIVE_UNREADABLE unreadable records in a row is an error.
  """

  def __init__(self, parent: grain.MapDataset, max_consecutive: int = MAX_CONSECUTIVE_UNREADABLE):
    super().__init__(parent)
    self._max_consecutive = max_consecutive

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    for skipped in range(self._max_consecutive + 1):
      try:
        example = self._parent[index + skipped]
      except UnreadableRecordError as e:
        logging.warning("Skipping an unreadable record at stream position %d: %s", index + skipped, e)
        continue
      example[SKIPPED_RECORDS] = np.int32(skipped)
      return example
    raise records.RecordError(f"{self._max_consecutive + 1} records in a row (stream positions {index}.."
                              f"{index + self._max_consecutive}) are unreadable; see the warnings above for "
                              "their files and check data.train_records")

  def __str__(self) -> str:
    return f"SkipUnreadableDataset(max_consecutive={self._max_consecutive})"


class HostRowsDataset(grain.MapDataset):
  """This host's rows of every global batch of `parent`: with b = B / P rows per host, element j is
  element (j // b) B + h b + (j % b) of the global stream, so the hosts' batches stacked in process
  order are the global batches of one process."""

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, global_batch_size: int):
    super().__init__(parent)
    self._host, self._hosts, self._global_batch = process_index, process_count, global_batch_size
    self._rows = global_batch_size // process_count

  def __len__(self) -> int:
    return len(self._parent) // self._hosts

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._rows)
    return self._parent[batch * self._global_batch + self._host * self._rows + row]

  def __str__(self) -> str:
    return f"HostRowsDataset(host={self._host} of {self._hosts}, rows={self._rows} of {self._global_batch})"


DEFAULT_CHECK_RECORDS = 32  # records read by check_sample: bounded, so opening stays fast at any size


def check_sample(source, transform, limit: int = DEFAULT_CHECK_RECORDS) -> int:
  """Runs `transform.check` on up to `limit` records spread over the shards (`source.sample_indices`);
  logs each record that fails (it will be skipped when drawn) and raises ConfigMismatchError when every
  sampled record fails: the data and the config disagree as a whole. Returns how many failed.
  A no-op for transforms without `check` or sources without `sample_indices`."""
  check = getattr(transform, "check", None)
  if check is None or not hasattr(source, "sample_indices"):
    return 0
  indexed = IndexedSource(source)
  sample = source.sample_indices(limit)
  unreadable, unfit = [], []
  for index in sample:
    try:
      record = source[index]
    except records.RecordError as e:
      unreadable.append(index)
      logging.warning("Record check at open: %s (record index %d); it will be skipped when drawn", e, index)
      continue
    try:
      check(record)
    except ConfigMismatchError as e:
      unfit.append(f"{indexed.where(index)} (record index {index}): {e}")
      logging.warning("Record check at open: %s; it will be skipped when drawn", unfit[-1])
  readable = len(sample) - len(unreadable)
  if readable and len(unfit) == readable:
    raise ConfigMismatchError(f"none of the {readable} records checked when opening the data fits the config, "
                              f"e.g. {unfit[0]}")
  logging.info("Checked %d records against the config: %d unreadable, %d do not fit (skipped when drawn).",
               len(sample), len(unreadable), len(unfit))
  return len(unreadable) + len(unfit)


def batched_stream(config, source, transform: grain.transforms.RandomMap, *, process_index: int = 0,
                   process_count: int = 1) -> grain.IterDataset:
  """source -> seed, global shuffle, repeat -> transform + record index -> skip unreadable records ->
  this host's rows of each global batch -> per-host batches -> workers.

  The common tail of every training pipeline: deterministic for a seed, the same global stream for any
  number of workers and hosts, and checkpointable. Examples gain HOST_KEYS (record_index, skipped_records).
  The records are checked first (check_sample). The returned dataset carries `describe_record(index)`
  ('file#n (id ...)'), which the trainer uses to name the records of a batch in errors.
  """
  if config.global_batch_size % process_count:
    raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by {process_count} hosts")
  check_sample(source, transform, config.data.get("check_records", DEFAULT_CHECK_RECORDS))
  indexed = IndexedSource(source)
  dataset = grain.MapDataset.source(indexed).seed(config.seed).shuffle().repeat()
  dataset = dataset.random_map(IndexedTransform(transform, indexed))
  dataset = SkipUnreadableDataset(dataset)
  # Lazy: a host reads and transforms only its own rows.
  dataset = HostRowsDataset(dataset, process_index, process_count, config.global_batch_size)
  dataset = dataset.batch(config.global_batch_size // process_count, drop_remainder=True)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=config.data.read_threads,
                                                      prefetch_buffer_size=config.data.prefetch_batches))
  if config.data.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers,
                                                               per_worker_buffer_size=config.data.prefetch_batches),
                                  worker_init_fn=processes.worker_init_fn())  # workers end with the trainer
  dataset.describe_record = indexed.describe
  return dataset


def make_train_dataset(config, record_pattern: str, *, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The per-host Ego-Exo training stream of batches of `global_batch_size / process_count` examples."""
  return batched_stream(config, open_train_records(config, record_pattern), egoexo_transform(config),
                        process_index=process_index, process_count=process_count)


def open_train_records(config, record_pattern: str):
  """sources.open_records for training: damaged shards are skipped past unless `config.data.strict`."""
  return sources.open_records(record_pattern, strict=bool(config.data.get("strict", False)))
