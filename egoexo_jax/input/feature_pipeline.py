"""EVGAP batches of feature windows, as Grain pipelines: ego-exo pairs (step 1) and view groups (step 2).

Windows. A record of T frames has windows starting at 0, w2, 2 w2, ... (stride w2 = `window_stride`,
100 in the paper) wherever w1 = `window_frames` (20) frames fit. Each drawn window is augmented in
length: a scale s ~ U[min_scale, max_scale] ([0.5, 2.0]) gives a span of round(s w1) frames around
the same centre (moved inside the record when it would stick out, cut to T when longer), and the
span is resampled back to w1 frames by linear interpolation at
    p_i = start + (i + 1/2) span / w1 - 1/2,   i = 0 .. w1 - 1
(span = w1 gives the frames themselves). Every view of one pair or group uses the same start and span:
the windows stay synchronised.

Step 1 (pairs): an element is G = `windows_per_recording` (10) consecutive windows of one record, and
each window becomes an ego-exo pair (one ego and one exo view drawn at random per pair). The other
pairs of the same recording in the batch are hard negatives. Batches of B pairs hold B / G elements.
  'ego_features', 'exo_features' (B, w1, C); 'record_index' (B,) int64 (into the records' index; the trainer keeps it on
  the host and names it when a loss is not finite), 'window' (B,) int32 (the nominal window number);
  'start', 'span' (B,) float32 (the augmented window, in recording frames).
Step 2 (groups): built as step 1, "the same configuration from the first step": an element is G
consecutive windows of one record (G = `windows_per_recording`, 10; the other scenes of the same
recording in a batch are hard negatives), and each window is a scene seen by M ego and N exo views
(`ego_views_per_group` 4, `exo_views_per_group` 8). A recording with fewer views of a kind gives all of
them once, in random order, and fills the rest by drawing among them with replacement. Batches of B
scenes hold B / G elements; G = 1 draws every scene independently.
  'ego_features' (B, M, w1, C), 'exo_features' (B, N, w1, C); 'ego_views' (B, M), 'exo_views' (B, N) int32;
  'record_index' (B,) int64, 'window' (B,) int32; 'start', 'span' (B,) float32.

Batches are planned per epoch (`EpochPlan`): epoch e shuffles its elements with a generator seeded by
(seed, e) and cuts them into batches, dropping the remainder. So no element (no scene, no window) is
ever twice in a batch, which `stream.batched_stream`'s repeat-then-batch cannot promise at an epoch
boundary; a repeated scene would be its own negative. The stream is otherwise built as batched_stream
builds its: Grain MapDataset over batch numbers -> this host's part of each global batch -> a random
map seeded by (seed, batch) that reads the records and cuts the windows -> worker processes. It is the
same for any number of workers or hosts and checkpointable (the iterator state is a batch number).
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np
from absl import logging

from egoexo_jax import processes
from egoexo_jax.input.feature_records import FeatureRecordSource
from egoexo_jax.input.stream import RECORD_INDEX  # 'record_index': kept on the host, named on a NaN loss

PAIR, GROUP = "pair", "group"


# --------------------------------------------------------------------------- windows


def window_starts(num_frames: int, window_frames: int, window_stride: int) -> np.ndarray:
  """Start frames of the nominal windows of a record: 0, w2, 2 w2, ... while w1 frames fit."""
  if num_frames < window_frames:
    return np.zeros((0,), np.int64)
  return np.arange(0, num_frames - window_frames + 1, window_stride, dtype=np.int64)


def training_frames(num_frames: int, heldout_fraction: float) -> int:
  """Frames [0, this) of a record may feed training; the last `heldout_fraction` of them are held out."""
  if not 0 <= heldout_fraction < 1:
    raise ValueError(f"config data.heldout_fraction is {heldout_fraction}; it must lie in [0, 1)")
  return num_frames - int(round(heldout_fraction * num_frames))


def augment_window(start: int, num_frames: int, window_frames: int, scale: float) -> tuple[int, int]:
  """(start, span) of a nominal window stretched by `scale` around its centre, kept inside the record."""
  span = int(min(max(round(scale * window_frames), 1), num_frames))
  centre = start + window_frames / 2
  new_start = int(min(max(round(centre - span / 2), 0), num_frames - span))
  return new_start, span


def resample(features: np.ndarray, start: int, span: int, window_frames: int) -> np.ndarray:
  """features (T, C) -> (window_frames, C): frames [start, start + span) linearly resampled."""
  positions = start + (np.arange(window_frames) + 0.5) * span / window_frames - 0.5
  positions = np.clip(positions, start, start + span - 1)
  low = np.floor(positions).astype(np.int64)
  high = np.minimum(low + 1, len(features) - 1)
  weight = (positions - low)[:, None].astype(np.float32)
  return (1 - weight) * features[low].astype(np.float32) + weight * features[high].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WindowSettings:
  window_frames: int = 20
  window_stride: int = 100
  min_scale: float = 0.5
  max_scale: float = 2.0

  def draw(self, start: int, num_frames: int, rng: np.random.Generator) -> tuple[int, int]:
    return augment_window(start, num_frames, self.window_frames, rng.uniform(self.min_scale, self.max_scale))


def choose_views(available: list[int], count: int, rng: np.random.Generator) -> np.ndarray:
  """`count` view indices: distinct when enough exist; else all of them, then draws with replacement."""
  order = rng.permutation(available)
  if count <= len(order):
    return order[:count]
  return np.concatenate([order, rng.choice(available, count - len(order), replace=True)])


# --------------------------------------------------------------------------- batch plan


class EpochPlan:
  """Batch number -> this host's elements: rows (record, first window) of the global batch.

  Epoch e = b // batches_per_epoch is a permutation of all elements drawn with np.random.default_rng((seed,
  e)); step-1 elements (G consecutive windows of a record) also start at a random offset per record and
  epoch, so every window gets used over the epochs. The global batch's rows are split evenly over hosts.
  """

  def __init__(self, window_counts: list[int], elements_per_batch: int, windows_per_element: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if elements_per_batch % process_count:
      raise ValueError(f"{elements_per_batch} elements per batch are not divisible by {process_count} hosts")
    self.window_counts = np.asarray(window_counts, np.int64)
    self.elements_per_batch = elements_per_batch
    self.windows_per_element = windows_per_element
    self.seed = seed
    self.host_slice = slice(process_index * elements_per_batch // process_count,
                            (process_index + 1) * elements_per_batch // process_count)
    self.elements_per_epoch = int((self.window_counts // windows_per_element).sum())
    if self.elements_per_epoch < elements_per_batch:
      raise ValueError(f"the records give {self.elements_per_epoch} elements of {windows_per_element} windows per "
                       f"epoch, fewer than the {elements_per_batch} one batch needs; use more data, a smaller "
                       "batch, a shorter window_stride or fewer windows_per_recording")
    self.batches_per_epoch = self.elements_per_epoch // elements_per_batch
    self._cached_epoch, self._cached = -1, None

  def epoch_elements(self, epoch: int) -> np.ndarray:
    """(elements_per_epoch, 2) rows (record, first window), in this epoch's shuffled order."""
    rng = np.random.default_rng((self.seed, epoch))
    per_record = self.window_counts // self.windows_per_element
    leftover = self.window_counts - per_record * self.windows_per_element
    offsets = rng.integers(0, leftover + 1)
    records = np.repeat(np.arange(len(per_record)), per_record)
    block = np.arange(len(records)) - np.repeat(np.cumsum(per_record) - per_record, per_record)
    rows = np.stack([records, offsets[records] + block * self.windows_per_element], axis=1)
    return rows[rng.permutation(len(rows))]

  def __call__(self, batch_number: int) -> np.ndarray:
    epoch, within = divmod(int(batch_number), self.batches_per_epoch)
    if epoch != self._cached_epoch:
      self._cached_epoch, self._cached = epoch, self.epoch_elements(epoch)
    first = within * self.elements_per_batch
    rows = self._cached[first:first + self.elements_per_batch]
    positions = np.arange(first, first + self.elements_per_batch)[:, None]  # global: host-count invariant RNG
    return np.concatenate([rows, positions], axis=1)[self.host_slice]


# --------------------------------------------------------------------------- batch builders


@dataclasses.dataclass(frozen=True)
class BuildBatch(grain.transforms.RandomMap):
  """Rows (record, first window, position in the global batch) -> a batch of pairs or groups."""

  source: FeatureRecordSource
  kind: str  # PAIR or GROUP
  windows: WindowSettings
  windows_per_element: int = 10  # G, pairs
  ego_views: int = 4  # M, groups
  exo_views: int = 8  # N, groups
  dtype: str = "float32"
  heldout_fraction: float = 0.0  # the end of every record, never drawn (training_frames)

  def random_map(self, rows: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = int(rng.integers(2**62))
    loaded = {}
    examples = []
    for record_index, first_window, position in rows.tolist():
      if record_index not in loaded:
        loaded[record_index] = self.source[record_index]
      element_rng = np.random.default_rng((base, position))
      if self.kind == PAIR:
        examples.append(self._pairs(loaded[record_index], record_index, first_window, element_rng))
      else:  # G scenes of consecutive windows, each its own group of views
        scenes = [self._group(loaded[record_index], record_index, window, element_rng)
                  for window in range(first_window, first_window + self.windows_per_element)]
        examples.append({k: np.stack([scene[k] for scene in scenes]) for k in scenes[0]})
    return {k: np.concatenate([e[k] for e in examples]) for k in examples[0]}

  def _window(self, recording, window: int, rng) -> tuple[int, int]:
    nominal = window * self.windows.window_stride
    return self.windows.draw(nominal, training_frames(recording.num_frames, self.heldout_fraction), rng)

  def _pairs(self, recording, record_index: int, first_window: int, rng) -> dict[str, np.ndarray]:
    ego_views, exo_views = recording.views_of_kind("ego"), recording.views_of_kind("exo")
    w1 = self.windows.window_frames
    out = {k: [] for k in ("ego_features", "exo_features", "start", "span", "window")}
    for window in range(first_window, first_window + self.windows_per_element):
      start, span = self._window(recording, window, rng)
      ego, exo = rng.choice(ego_views), rng.choice(exo_views)
      out["ego_features"].append(resample(recording.features[ego], start, span, w1))
      out["exo_features"].append(resample(recording.features[exo], start, span, w1))
      out["start"].append(recording.first_frame + start)
      out["span"].append(span)
      out["window"].append(window)
    return {"ego_features": np.stack(out["ego_features"]).astype(self.dtype),
            "exo_features": np.stack(out["exo_features"]).astype(self.dtype),
            RECORD_INDEX: np.full(self.windows_per_element, record_index, np.int64),
            "window": np.asarray(out["window"], np.int32), "start": np.asarray(out["start"], np.float32),
            "span": np.asarray(out["span"], np.float32)}

  def _group(self, recording, record_index: int, window: int, rng) -> dict[str, np.ndarray]:
    start, span = self._window(recording, window, rng)
    w1 = self.windows.window_frames
    ego = choose_views(recording.views_of_kind("ego"), self.ego_views, rng)
    exo = choose_views(recording.views_of_kind("exo"), self.exo_views, rng)
    windows = {name: np.stack([resample(recording.features[v], start, span, w1) for v in views]).astype(self.dtype)
               for name, views in (("ego_features", ego), ("exo_features", exo))}
    return {**windows,
            "ego_views": ego.astype(np.int32), "exo_views": exo.astype(np.int32),
            RECORD_INDEX: np.int64(record_index), "window": np.int32(window),
            "start": np.float32(recording.first_frame + start),
            "span": np.float32(span)}


# --------------------------------------------------------------------------- datasets


def window_settings(config) -> WindowSettings:
  data = config.data
  return WindowSettings(data.window_frames, data.window_stride, data.min_window_scale, data.max_window_scale)


def make_dataset(config, source: FeatureRecordSource, kind: str, *, process_index: int = 0,
                 process_count: int = 1, exclude_recordings=()) -> grain.IterDataset:
  """This host's stream of step-1 (`kind` 'pair') or step-2 ('group') batches of `config.global_batch_size`
  pairs or scenes in all. Records of `exclude_recordings`, and the last `data.heldout_fraction` of every
  record's frames, are held out for evaluation: never drawn, not even by a stretched window."""
  data = config.data
  windows = window_settings(config)
  excluded = set(exclude_recordings)
  heldout_fraction = data.get("heldout_fraction", 0.0)
  counts = [0 if e["recording"] in excluded else
            len(window_starts(training_frames(e["num_frames"], heldout_fraction), windows.window_frames,
                              windows.window_stride)) for e in source.entries]
  if kind not in (PAIR, GROUP):
    raise ValueError(f"unknown batch kind '{kind}': use '{PAIR}' or '{GROUP}'")
  group = data.windows_per_recording
  if config.global_batch_size % group:
    raise ValueError(f"global_batch_size {config.global_batch_size} is not a multiple of "
                     f"data.windows_per_recording {group}: a batch is whole groups of one recording's windows")
  elements_per_batch, windows_per_element = config.global_batch_size // group, group
  unused = sum(c < windows_per_element for c, e in zip(counts, source.entries) if e["recording"] not in excluded)
  if unused:
    logging.warning("%d of %d records have fewer than %d windows of %d frames (stride %d) and are not used.",
                    unused, len(counts), windows_per_element, windows.window_frames, windows.window_stride)
  plan = EpochPlan(counts, elements_per_batch, windows_per_element, config.seed, process_index, process_count)
  build = BuildBatch(source, kind, windows, windows_per_element=windows_per_element,
                     ego_views=data.ego_views_per_group, exo_views=data.exo_views_per_group,
                     dtype=data.get("batch_dtype", "float32"), heldout_fraction=heldout_fraction)
  dataset = grain.MapDataset.range(sys.maxsize).map(plan).seed(config.seed).random_map(build)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                                      prefetch_buffer_size=data.prefetch_batches))
  if data.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers,
                                                               per_worker_buffer_size=data.prefetch_batches),
                                  worker_init_fn=processes.worker_init_fn())  # workers end with the trainer
  return dataset
