"""Grain pipelines of SUM-L (Wang et al., ICCV 2023): ego clips with their mined exo pseudo-pairs.

Stage (b), joint training, per host:

  ego records (random access) -> seed, global shuffle, repeat -> this host's slice
    -> PairedTrainTransform: the ego clip, its labels and narration embedding d_f; one exo clip among
       the ego clip's top-k pseudo-pairs (drawn with the per-element RNG), read by video_id from the
       exo records, with its labels and narration embedding d_t
    -> per-host batches -> worker processes                      (stream.batched_stream)

Stage (a) trains on the exo records alone: ExoTrainTransform (exo clip and labels), the same tail.

Pairs (`data.pairs`): a narration pair file (.npz, written by egoexo_jax.pseudo_labels.narration_pairs)
or, for data with true ego-exo pairs (Charades-Ego), a CSV with columns `ego_id,exo_id`; both are read by
pair_files.load_pair_table.

Labels (kinds `data.ego_label_kind`, `data.exo_label_kind`, with `model.<view>_num_classes` = K_0, K_1, ...), encoded by
labels.encode_labels:
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

from egoexo_jax import atomic_files
from egoexo_jax.input import labels, prepared_records, records, sources, stream
from egoexo_jax.input.clip_sampler import ClipSampler, clip_sampler
from egoexo_jax.input.pair_files import PairingError, PairTable, load_pair_table

VIEWS = ("ego", "exo")


def view_heads(config, view: str) -> labels.Heads:
  """(head name, classes) of `view`'s labels: config model.<view>_num_classes, ordered by
  data.<view>_label_layout when it names several heads."""
  return labels.head_sizes(config.model[f"{view}_num_classes"], tuple(config.data.get(f"{view}_label_layout", ())),
                           key=f"model.{view}_num_classes", layout_key=f"data.{view}_label_layout")


def view_labels(record: records.VideoRecord, heads: labels.Heads, kind: str, view: str) -> np.ndarray:
  """labels.encode_labels of a record of `view`, its errors naming the record and the config keys."""
  return labels.encode_labels(record.labels, heads, kind, f"{view} record '{record.video_id}'",
                              key=f"model.{view}_num_classes")


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

  Output: 'ego_clips' uint8 (T, S, S, 3), 'ego_labels' (view_labels); with_exo: 'exo_clips', 'exo_labels'
  of one of the first `top_k` pseudo-pairs; with_text: 'ego_text' and 'exo_text' float32 (D,). With
  neither (FPV-only), `pairs` may be None: nothing is looked up.
  """

  clip: ClipSampler
  pairs: PairTable | None
  exo_source: Any
  exo_index: Mapping[str, int]
  exo_pattern: str
  ego_heads: labels.Heads
  exo_heads: labels.Heads
  ego_label_kind: str = "single"
  exo_label_kind: str = "single"
  top_k: int = 1
  with_exo: bool = True
  with_text: bool = True

  def random_map(self, record: records.VideoRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
    row = self.pairs.row(record.video_id) if self.with_exo or self.with_text else None
    example = {**self.clip.sample(record, rng).fields("ego_clips"),
               "ego_labels": view_labels(record, self.ego_heads, self.ego_label_kind, "ego")}
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
      example.update(self.clip.sample(exo, rng).fields("exo_clips"))
      example["exo_labels"] = view_labels(exo, self.exo_heads, self.exo_label_kind, "exo")
      if self.with_text:
        example["exo_text"] = self.pairs.exo_text[exo_row]
    return example


@dataclasses.dataclass(frozen=True)
class ExoTrainTransform(grain.transforms.RandomMap):
  """Exo VideoRecord -> {'exo_clips', 'exo_labels'} (stage (a): the exo encoder on its own dataset)."""

  clip: ClipSampler
  exo_heads: labels.Heads
  exo_label_kind: str = "single"

  def random_map(self, record: records.VideoRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {**self.clip.sample(record, rng).fields("exo_clips"),
            "exo_labels": view_labels(record, self.exo_heads, self.exo_label_kind, "exo")}


# --------------------------------------------------------------------------- datasets


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
  data = config.data
  ego_source = stream.open_train_records(config, ego_pattern)
  pairs, exo_source, exo_index = None, None, {}
  if with_exo or with_text:
    pairs = load_pair_table(data.pairs)
    if with_exo:
      exo_source = stream.open_train_records(config, exo_pattern)
      exo_index = id_index(record_ids(exo_source, exo_pattern, cache_dir), exo_pattern)
    check_pairs(pairs, record_ids(ego_source, ego_pattern, cache_dir), exo_index, ego_pattern=ego_pattern,
                exo_pattern=exo_pattern, top_k=data.pair_top_k, with_exo=with_exo, with_text=with_text)
  transform = PairedTrainTransform(
      clip=clip_sampler(config), pairs=pairs, exo_source=exo_source, exo_index=exo_index,
      exo_pattern=exo_pattern or "", ego_heads=view_heads(config, "ego"), exo_heads=view_heads(config, "exo"),
      ego_label_kind=data.ego_label_kind, exo_label_kind=data.exo_label_kind,
      top_k=data.pair_top_k, with_exo=with_exo, with_text=with_text)
  return stream.batched_stream(config, ego_source, transform, process_index=process_index,
                               process_count=process_count)


def make_exo_dataset(config, exo_pattern: str, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The per-host stage (a) stream: batches of ExoTrainTransform examples."""
  transform = ExoTrainTransform(clip_sampler(config), view_heads(config, "exo"), config.data.exo_label_kind)
  return stream.batched_stream(config, stream.open_train_records(config, exo_pattern), transform,
                               process_index=process_index, process_count=process_count)
