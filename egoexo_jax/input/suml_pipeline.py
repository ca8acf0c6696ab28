"""Grain pipelines of SUM-L (Wang et al., ICCV 2023): ego clips with their mined exo pseudo-pairs.

Stage (b), joint training, per host:

  ego records (random access) -> seed, global shuffle, repeat -> this host's slice
    -> PairedTrainTransform: the ego clip, its labels and narration embedding d_f; one exo clip among
       the ego clip's top-k pseudo-pairs (drawn with the per-element RNG), read by video_id from the
       exo records, with its labels and narration embedding d_t
    -> per-host batches -> worker processes                      (pipelines.batched_stream)

Stage (a) trains on the exo records alone: ExoTrainTransform (exo clip and labels), the same tail.

Pairs (`data.pairs`): the `.npz` written by egoexo_jax.pseudo_labels.narration_pairs, or, for data with
true ego-exo pairs (Charades-Ego), a CSV with columns `ego_id,exo_id` (one row per ego clip; it carries
no narration embeddings, so only the baselines without text terms can use it).

Labels (`data.ego_labels`, `data.exo_labels`, with `model.<view>_num_classes` = K_0, K_1, ...):
  'single'       one class per head, in head order: a record's labels [verb, noun] for heads (97, 300),
                 [action] for one head. Output int32 (H,).
  'multi_label'  a set of class ids over the heads' classes laid end to end (head 0 first; LEMMA verbs
                 then nouns, Charades' 157). Output a float32 multi-hot (K_0 + K_1 + ...,).

Exo records are found by video_id through an id -> index map built once by reading every record; the
ids are cached as JSON in `cache_dir`, keyed by the shards' paths, sizes and modification times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from egoexo_jax import atomic_files
from egoexo_jax.input import csv_rows, pipelines, records, sources, transforms
from egoexo_jax.pseudo_labels import narration_pairs

LABEL_KINDS = ("single", "multi_label")
VIEWS = ("ego", "exo")


class PairingError(ValueError):
  """Pairs and records that do not fit together; the message names the clip id and the files."""


def encode_labels(labels: np.ndarray, num_classes: Sequence[int], kind: str, where: str) -> np.ndarray:
  """A record's labels -> the training target (see the module docstring); errors name `where`."""
  labels = np.asarray(labels, np.int64)
  if kind == "single":
    if len(labels) != len(num_classes):
      raise pipelines.ConfigMismatchError(
          f"{where}: field 'labels' holds {labels.tolist()}; 'single' labels need one class per head "
          f"({len(num_classes)} heads of sizes {tuple(num_classes)})")
    for head, (label, size) in enumerate(zip(labels, num_classes)):
      if not 0 <= label < size:
        raise pipelines.ConfigMismatchError(f"{where}: label {label} of head {head} is outside [0, {size})")
    return labels.astype(np.int32)
  if kind == "multi_label":
    total = int(sum(num_classes))
    if len(labels) and (labels.min() < 0 or labels.max() >= total):
      raise pipelines.ConfigMismatchError(
          f"{where}: labels {labels.tolist()} fall outside [0, {total}) (heads {tuple(num_classes)})")
    target = np.zeros(total, np.float32)
    target[labels] = 1.0
    return target
  raise ValueError(f"unknown label kind '{kind}' (config data.ego_labels/exo_labels): use one of {LABEL_KINDS}")


@dataclasses.dataclass(frozen=True)
class ClipSampler:
  """VideoRecord -> uint8 clip (T, S, S, 3): random start, short-side jitter, crop and flip (or, with
  rng None, the centre clip and crop used for evaluation)."""

  clip_length: int
  frame_stride: int
  crop_size: int
  min_short_side: int
  max_short_side: int

  def __call__(self, record: records.VideoRecord, rng: np.random.Generator | None) -> np.ndarray:
    indices = transforms.sample_frame_indices(record.num_frames, self.clip_length, self.frame_stride, rng)
    window = transforms.sample_crop_window(record.height, record.width, self.crop_size, self.min_short_side,
                                           self.max_short_side, rng)
    return transforms.decode_and_crop(record.frames, indices, window)


def clip_sampler(config) -> ClipSampler:
  data = config.data
  return ClipSampler(data.clip_length, data.frame_stride, data.crop_size, data.min_short_side, data.max_short_side)


# --------------------------------------------------------------------------- pairs


@dataclasses.dataclass(frozen=True, eq=False)
class PairTable:
  """Each ego clip's exo partners: candidates[r] are rows of exo_ids, best first (k per ego clip).

  ego_text (N, D) / exo_text (M, D): L2-normalised narration embeddings, None for true-pair CSVs.
  counts (N,): how many of row r's candidates a partner is drawn among (label-mined files: fewer than k
  where the label rules found fewer); None: all k.
  """

  path: str
  ego_rows: Mapping[str, int]
  exo_ids: np.ndarray
  candidates: np.ndarray  # int32 (N, k)
  ego_text: np.ndarray | None
  exo_text: np.ndarray | None
  counts: np.ndarray | None = None

  @property
  def k(self) -> int:
    return self.candidates.shape[1]

  def row(self, ego_id: str) -> int:
    try:
      return self.ego_rows[ego_id]
    except KeyError:
      raise PairingError(f"ego clip '{ego_id}' has no row in the pair file {self.path}: its pseudo-pairs and "
                         "narration embedding are missing (mine pairs for every ego clip you train on)") from None


def load_pair_table(path: str) -> PairTable:
  """Reads a narration pair file (.npz) or a true-pair CSV (`ego_id,exo_id`)."""
  if path.endswith(".npz"):
    pairs = narration_pairs.load_pairs(path)
    return PairTable(path, {str(v): i for i, v in enumerate(pairs.ego_ids)}, np.asarray(pairs.exo_ids, str),
                     np.asarray(pairs.pair_indices, np.int32), np.asarray(pairs.ego_embeddings, np.float32),
                     np.asarray(pairs.exo_embeddings, np.float32), pairs.pair_counts)
  if path.endswith(".csv"):
    partner, exo_row = {}, {}  # ego id -> the row of its exo clip; exo id -> row
    for _, where, fields in csv_rows.read_csv_rows(path, ("ego_id", "exo_id"), PairingError):
      ego_id, exo_id = (fields["ego_id"] or "").strip(), (fields["exo_id"] or "").strip()
      if not ego_id or not exo_id:
        raise PairingError(f"{where}: empty ego_id or exo_id")
      if ego_id in partner:
        raise PairingError(f"{where}: ego clip '{ego_id}' is paired twice")
      partner[ego_id] = exo_row.setdefault(exo_id, len(exo_row))
    if not partner:
      raise PairingError(f"{path}: no pairs")
    return PairTable(path, {e: i for i, e in enumerate(partner)}, np.asarray(list(exo_row), str),
                     np.asarray(list(partner.values()), np.int32)[:, None], None, None)
  raise PairingError(f"{path}: pairs must be a narration pair file (.npz) or a true-pair CSV (.csv)")


# --------------------------------------------------------------------------- record ids


def record_ids(source, pattern: str, cache_dir: str | None = None) -> list[str]:
  """The video_id of every record of `source` (opened from `pattern`), in index order; cached as JSON."""
  cache = None
  if cache_dir:
    files = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in sources.expand_pattern(pattern)]
    key = hashlib.sha1(json.dumps([os.path.abspath(p) for p, *_ in files] + [f[1:] for f in files]).encode())
    cache = os.path.join(cache_dir, f"record_ids-{key.hexdigest()[:16]}.json")
    if os.path.exists(cache):
      with open(cache) as f:
        return json.load(f)["ids"]
  ids = [source[i].video_id for i in range(len(source))]
  if cache:
    with atomic_files.atomic_write(cache, "w") as f:
      json.dump({"pattern": pattern, "ids": ids}, f)
  return ids


def id_index(ids: Sequence[str], pattern: str) -> dict[str, int]:
  index = {}
  for i, video_id in enumerate(ids):
    if video_id in index:
      raise PairingError(f"'{pattern}': video_id '{video_id}' is in records {index[video_id]} and {i}; "
                         "ids must be unique to look exo clips up by id")
    index[video_id] = i
  return index


# --------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True, eq=False)
class PairedTrainTransform(grain.transforms.RandomMap):
  """Ego VideoRecord -> one joint-training example.

  Output: 'ego_clips' uint8 (T, S, S, 3), 'ego_label' (encode_labels); with_exo: 'exo_clips', 'exo_label'
  of one of the first `top_k` pseudo-pairs; with_text: 'ego_text' and 'exo_text' float32 (D,). With
  neither (FPV-only), `pairs` may be None: nothing is looked up.
  """

  clip: ClipSampler
  pairs: PairTable | None
  exo_source: Any
  exo_index: Mapping[str, int]
  exo_pattern: str
  ego_num_classes: tuple[int, ...]
  exo_num_classes: tuple[int, ...]
  ego_labels: str = "single"
  exo_labels: str = "single"
  top_k: int = 1
  with_exo: bool = True
  with_text: bool = True

  def random_map(self, record: records.VideoRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
    row = self.pairs.row(record.video_id) if self.with_exo or self.with_text else None
    example = {"ego_clips": self.clip(record, rng),
               "ego_label": encode_labels(record.labels, self.ego_num_classes, self.ego_labels,
                                          f"ego record '{record.video_id}'")}
    if self.with_text:
      example["ego_text"] = self.pairs.ego_text[row]
    if self.with_exo:
      drawn = self.top_k if self.pairs.counts is None else min(self.top_k, int(self.pairs.counts[row]))
      exo_row = int(self.pairs.candidates[row, int(rng.integers(drawn)) if drawn > 1 else 0])
      exo_id = str(self.pairs.exo_ids[exo_row])
      exo = self.exo_source[self.exo_index[exo_id]]
      if exo.video_id != exo_id:
        raise PairingError(f"'{self.exo_pattern}' changed since its id index was built: expected '{exo_id}', "
                           f"read '{exo.video_id}'; delete the record_ids-*.json cache")
      example["exo_clips"] = self.clip(exo, rng)
      example["exo_label"] = encode_labels(exo.labels, self.exo_num_classes, self.exo_labels,
                                           f"exo record '{exo_id}'")
      if self.with_text:
        example["exo_text"] = self.pairs.exo_text[exo_row]
    return example


@dataclasses.dataclass(frozen=True)
class ExoTrainTransform(grain.transforms.RandomMap):
  """Exo VideoRecord -> {'exo_clips', 'exo_label'} (stage (a): the exo encoder on its own dataset)."""

  clip: ClipSampler
  exo_num_classes: tuple[int, ...]
  exo_labels: str = "single"

  def random_map(self, record: records.VideoRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"exo_clips": self.clip(record, rng),
            "exo_label": encode_labels(record.labels, self.exo_num_classes, self.exo_labels,
                                       f"exo record '{record.video_id}'")}


# --------------------------------------------------------------------------- datasets


def prepare_records(config, workdir: str, view: str) -> str:
  """The record glob of `view` ('ego' or 'exo'): `data.<view>_records`, or else `data.<view>_manifest`
  converted once into <workdir>/records/<view> (by process 0; the others wait)."""
  pattern = config.data.get(f"{view}_records", "")
  if pattern:
    return pattern
  import jax  # pylint: disable=g-import-not-at-top

  manifest = config.data.get(f"{view}_manifest", "")
  if not manifest:
    raise ValueError(f"config data.{view}_records and data.{view}_manifest are both empty")
  prefix = os.path.join(workdir, "records", view)
  if jax.process_index() == 0 and not os.path.exists(prefix + ".json"):
    from egoexo_jax.input import convert  # pylint: disable=g-import-not-at-top  (PyAV only when converting)

    logging.info("Converting %s into %s (short side %d).", manifest, prefix, config.data.convert_short_side)
    report = convert.convert_manifest(manifest, prefix, short_side=config.data.convert_short_side,
                                      workers=max(1, config.data.num_workers))
    logging.info("Converted %d %s videos (%d skipped).", report.written, view, len(report.skipped))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"prepare_{view}_records")
  return prefix + ".tfrecord-*"


def check_pairs(pairs: PairTable, ego_ids: Sequence[str], exo_index: Mapping[str, int], *, ego_pattern: str,
                exo_pattern: str, top_k: int, with_exo: bool, with_text: bool) -> None:
  """Fails before training when an ego record has no pair row, a used exo partner has no record, or
  the text terms need embeddings the pair file lacks."""
  if with_text and pairs.ego_text is None:
    raise PairingError(f"{pairs.path} has no narration embeddings (a true-pair CSV), but the loss uses "
                       "them (L_aw, L_m): use a narration pair file (.npz) or set loss.weight_video_text to 0 "
                       "and loss.alignment to a baseline without text")
  if not 1 <= top_k <= pairs.k:
    raise PairingError(f"config data.pair_top_k is {top_k}; {pairs.path} holds {pairs.k} pairs per ego clip")
  missing = [i for i in ego_ids if i not in pairs.ego_rows]
  if missing:
    raise PairingError(f"{len(missing)} ego records of '{ego_pattern}' have no row in the pair file {pairs.path} "
                       f"(their narration embeddings and pseudo-pairs are missing), e.g. '{missing[0]}'")
  if with_exo:
    for ego_id in ego_ids:
      for exo_row in pairs.candidates[pairs.ego_rows[ego_id], :top_k]:
        exo_id = str(pairs.exo_ids[exo_row])
        if exo_id not in exo_index:
          raise PairingError(f"exo clip '{exo_id}', paired with ego clip '{ego_id}' in {pairs.path}, has no "
                             f"record in '{exo_pattern}'")


def make_paired_dataset(config, ego_pattern: str, exo_pattern: str | None, *, with_exo: bool, with_text: bool,
                        cache_dir: str | None = None, process_index: int = 0,
                        process_count: int = 1) -> grain.IterDataset:
  """The per-host stage (b) stream: batches of PairedTrainTransform examples."""
  data, model = config.data, config.model
  ego_source = pipelines.open_train_records(config, ego_pattern)
  pairs, exo_source, exo_index = None, None, {}
  if with_exo or with_text:
    pairs = load_pair_table(data.pairs)
    if with_exo:
      exo_source = pipelines.open_train_records(config, exo_pattern)
      exo_index = id_index(record_ids(exo_source, exo_pattern, cache_dir), exo_pattern)
    check_pairs(pairs, record_ids(ego_source, ego_pattern, cache_dir), exo_index, ego_pattern=ego_pattern,
                exo_pattern=exo_pattern, top_k=data.pair_top_k, with_exo=with_exo, with_text=with_text)
  transform = PairedTrainTransform(
      clip=clip_sampler(config), pairs=pairs, exo_source=exo_source, exo_index=exo_index,
      exo_pattern=exo_pattern or "", ego_num_classes=tuple(model.ego_num_classes),
      exo_num_classes=tuple(model.exo_num_classes), ego_labels=data.ego_labels, exo_labels=data.exo_labels,
      top_k=data.pair_top_k, with_exo=with_exo, with_text=with_text)
  return pipelines.batched_stream(config, ego_source, transform, process_index=process_index,
                                  process_count=process_count)


def make_exo_dataset(config, exo_pattern: str, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The per-host stage (a) stream: batches of ExoTrainTransform examples."""
  transform = ExoTrainTransform(clip_sampler(config), tuple(config.model.exo_num_classes), config.data.exo_labels)
  return pipelines.batched_stream(config, pipelines.open_train_records(config, exo_pattern), transform,
                                  process_index=process_index, process_count=process_count)
