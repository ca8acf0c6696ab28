"""The shared tail of every clip pipeline: records -> seeded shuffled stream -> batches, per host.

  records (TFRecord/ArrayRecord, random access)
    -> seed + global shuffle (a new permutation every epoch) -> repeat
    -> the method's transform (random: clip start, scale jitter, crop, flip, ...) + 'record_index'
       (the record's index in the sorted shards)
    -> skip unreadable records ('skipped_records': how many were passed over for this example)
    -> this host's rows of each global batch (HostRowsDataset)
    -> batch(per-host batch) -> worker processes (mp_prefetch)

Every random choice comes from the per-element RNG that Grain derives from the seed and the
element's index in the global stream (the host split comes after the transform, and a host computes
only its own elements), so the global stream is the same for any number of workers or hosts: global
batch k is elements [kB, (k+1)B) in this order whatever the topology, host h holding rows
[h B/P, (h+1) B/P) of it (the rows its devices hold, as jax.devices() is ordered by process). An
iterator restored from a checkpointed state continues with exactly the batches the interrupted run
would have seen.

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
from typing import Any

import grain
import numpy as np
from absl import logging

from egoexo_jax import processes
from egoexo_jax.input import records, sources


class ConfigMismatchError(ValueError):
  """A record whose contents do not fit the config or the format's rules (label range, teacher vector
  length, non-finite teacher values, invalid boxes). In a training stream such a record is skipped
  like an unreadable one; a dataset whose sampled records all fail is an error when it is opened."""


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


def open_train_records(config, record_pattern: str):
  """sources.open_records for training: damaged shards are skipped past unless `config.data.strict`."""
  return sources.open_records(record_pattern, strict=bool(config.data.get("strict", False)))
