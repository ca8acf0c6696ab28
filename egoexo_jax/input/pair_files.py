"""The SUM-L pair files: the narration pair file format, and the pair table a pipeline draws partners from.

Narration pair files are written by the teachers (egoexo_jax.pseudo_labels.narration_pairs, with
label_pairs.py's label rules) and read by the SUM-L pipeline (suml_pipeline.py); the format lives here, in
input/, so that the pipeline does not import the teachers' command-line module.

The pair file: one `.npz` file (`np.savez`, no pickled objects: read it with `np.load(path, allow_pickle=False)`
or `load_pairs(path)`). N ego clips, M exo clips, D embedding dimensions, k pairs per ego clip:
  format_version     int, 1.
  ego_ids            unicode (N,)    the ego CSV's video_id column, in file order.
  exo_ids            unicode (M,)    the same for the exo CSV.
  ego_narrations     unicode (N,)    the narrations, stripped.
  exo_narrations     unicode (M,)
  ego_embeddings     float32 (N, D)  text embeddings, L2-normalised (SUM-L's L_m uses them).
  exo_embeddings     float32 (M, D)
  pair_indices       int32 (N, k)    row i: rows of exo_* paired with ego clip i, most similar first.
  pair_similarities  float32 (N, k)  their cosine similarities, in [-1, 1], non-increasing along a row.
  model              unicode ()      the sentence-transformers model that made the embeddings.
  k                  int ()
Written by `--mining=labels` only (absent: narration mining, every row holds k candidates):
  mining             unicode ()      'labels'.
  pair_counts        int32 (N,)      how many entries of each row are candidates (the rest repeat the first);
                                     the pipeline draws among min(data.pair_top_k, count).
  pair_rules         int8 (N,)       each row's rule: 2 same, 1 subset, 3 verb-only, 4 noun-only, 0 fallback
                                     (the release's same_idx). Rows list candidates in exo order, so their
                                     similarities need not decrease.
The file is written under a temporary name and renamed when complete, so a reader never sees half a file.

For data with true ego-exo pairs (Charades-Ego), `load_pair_table` also reads a CSV with columns
`ego_id,exo_id` (one row per ego clip; it carries no narration embeddings, so only the baselines
without text terms can use it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from egoexo_jax import atomic_files
from egoexo_jax.input import csv_rows

FORMAT_VERSION = 1
PAIR_FIELDS = ("format_version", "ego_ids", "exo_ids", "ego_narrations", "exo_narrations", "ego_embeddings",
               "exo_embeddings", "pair_indices", "pair_similarities", "model", "k")


class PairFileError(ValueError):
  """A pair file that is missing a field or whose fields disagree; the message names the file."""


class PairingError(ValueError):
  """Pairs and records that do not fit together; the message names the clip id and the files."""


# --------------------------------------------------------------------------- pair files


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: == on array fields has no single truth value
class PairFile:
  """The contents of a pair file (see the module docstring for the fields)."""

  ego_ids: np.ndarray
  exo_ids: np.ndarray
  ego_narrations: np.ndarray
  exo_narrations: np.ndarray
  ego_embeddings: np.ndarray
  exo_embeddings: np.ndarray
  pair_indices: np.ndarray
  pair_similarities: np.ndarray
  model: str
  k: int
  mining: str = "narration"
  pair_counts: np.ndarray | None = None  # label mining: candidates per row
  pair_rules: np.ndarray | None = None  # label mining: each row's rule code (pseudo_labels/label_pairs.RULES)
  _ego_row: dict = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "_ego_row", {str(v): i for i, v in enumerate(self.ego_ids)})

  def ego_row(self, ego_id: str) -> int:
    """Row of `ego_id` in the ego arrays; KeyError when the file has no such clip."""
    try:
      return self._ego_row[ego_id]
    except KeyError:
      raise KeyError(f"no ego clip '{ego_id}' in this pair file ({len(self.ego_ids)} ego clips)") from None

  def pairs_for(self, ego_id: str) -> list[tuple[str, float]]:
    """[(exo_id, cosine similarity)] of the k exo clips paired with `ego_id`, most similar first."""
    row = self.ego_row(ego_id)
    return [(str(self.exo_ids[j]), float(s)) for j, s in zip(self.pair_indices[row], self.pair_similarities[row])]

  @property
  def best_similarities(self) -> np.ndarray:
    """float32 (N,): each ego clip's top-1 similarity."""
    return self.pair_similarities[:, 0]


def save_pairs(path: str, pairs: PairFile) -> None:
  """Writes `pairs` to `path` (exactly that name) under a temporary name, then renames it."""
  arrays = {
      "format_version": np.int64(FORMAT_VERSION),
      "ego_ids": np.asarray(pairs.ego_ids, dtype=str),
      "exo_ids": np.asarray(pairs.exo_ids, dtype=str),
      "ego_narrations": np.asarray(pairs.ego_narrations, dtype=str),
      "exo_narrations": np.asarray(pairs.exo_narrations, dtype=str),
      "ego_embeddings": np.asarray(pairs.ego_embeddings, np.float32),
      "exo_embeddings": np.asarray(pairs.exo_embeddings, np.float32),
      "pair_indices": np.asarray(pairs.pair_indices, np.int32),
      "pair_similarities": np.asarray(pairs.pair_similarities, np.float32),
      "model": np.asarray(pairs.model, dtype=str),
      "k": np.int64(pairs.k),
  }
  if pairs.mining != "narration":
    arrays.update(mining=np.asarray(pairs.mining, dtype=str), pair_counts=np.asarray(pairs.pair_counts, np.int32),
                  pair_rules=np.asarray(pairs.pair_rules, np.int8))
  with atomic_files.atomic_write(path) as f:  # a file object, so np.savez does not append ".npz" to the name
    np.savez(f, **arrays)


def load_pairs(path: str) -> PairFile:
  """Reads and checks a pair file written by `save_pairs` (or the command line)."""
  with np.load(path, allow_pickle=False) as data:
    missing = [name for name in PAIR_FIELDS if name not in data.files]
    if missing:
      raise PairFileError(f"{path}: not a narration pair file; missing fields {missing}")
    fields = {name: data[name] for name in PAIR_FIELDS}
    optional = {name: data[name] for name in ("mining", "pair_counts", "pair_rules") if name in data.files}
  if int(fields["format_version"]) != FORMAT_VERSION:
    raise PairFileError(f"{path}: format_version {int(fields['format_version'])}; this code reads {FORMAT_VERSION}")
  num_ego, num_exo, k = len(fields["ego_ids"]), len(fields["exo_ids"]), int(fields["k"])
  expected = {"ego_narrations": (num_ego,), "exo_narrations": (num_exo,), "pair_indices": (num_ego, k),
              "pair_similarities": (num_ego, k)}
  for name, shape in expected.items():
    if fields[name].shape != shape:
      raise PairFileError(f"{path}: {name} has shape {fields[name].shape}, expected {shape}")
  for name, rows in (("ego_embeddings", num_ego), ("exo_embeddings", num_exo)):
    if fields[name].ndim != 2 or len(fields[name]) != rows:
      raise PairFileError(f"{path}: {name} has shape {fields[name].shape}, expected ({rows}, D)")
  if num_ego and (fields["pair_indices"].min() < 0 or fields["pair_indices"].max() >= num_exo):
    raise PairFileError(f"{path}: pair_indices outside [0, {num_exo})")
  if "mining" in optional:
    optional["mining"] = str(optional["mining"])
    counts = optional.get("pair_counts")
    if counts is None or counts.shape != (num_ego,) or (num_ego and (counts.min() < 1 or counts.max() > k)):
      raise PairFileError(f"{path}: pair_counts must hold ({num_ego},) values in [1, {k}]")
  del fields["format_version"]
  return PairFile(**{**fields, "model": str(fields["model"]), "k": k, **optional})


# --------------------------------------------------------------------------- pair tables


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
    pairs = load_pairs(path)
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
