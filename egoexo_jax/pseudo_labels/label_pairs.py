"""SUM-L's released pair rules: exo partners chosen by shared verb and noun labels, not by narration text.

The released dataset (github wqtwjt1996/SUM-L, slowfast/datasets/epic100_unpair_tpv_txt.py,
`_find_pseudo_pair` and `__getitem__`) compares each ego clip's label sets V_f, N_f (EPIC-100: one verb,
one noun) with each exo clip's sets V_t, N_t (LEMMA's, mapped to EPIC-100 class ids) and files the exo clip
under the first rule that holds, in this order:

  rule 2 'same'       V_f == V_t and N_f == N_t
  rule 1 'subset'     V_f <= V_t and N_f <= N_t
  rule 3 'verb_only'  V_f <= V_t and not N_f <= N_t
  rule 4 'noun_only'  not V_f <= V_t and N_f <= N_t

keeping the first MAX_CANDIDATES (3) exo clips of each rule in exo order. The ego clip's partner comes from
the best non-empty rule (same, then subset, verb-only, noun-only), drawn at random among its candidates
each time the clip is loaded (here: the pipeline's per-element RNG over `counts[i]` candidates,
data.pair_top_k = 3). The codes are the release's `same_idx`.

Rule 0 'fallback': an ego clip with no candidate at all is paired, in the release, with a random
'subset' candidate of a random other ego clip, drawn anew at each load. Here MAX_CANDIDATES such draws
are made once, with a seeded NumPy generator, and the pipeline picks among them.

Differences from the release, deliberate: with fewer than 3 candidates the release's `random.randint(0,
2)` raises IndexError (or loops forever in the fallback when no ego clip has a 'subset' candidate); here the
draw is among the candidates there are, and no 'subset' candidate anywhere is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from egoexo_jax import progress
from egoexo_jax.input import csv_rows

MAX_CANDIDATES = 3  # the release's max_num
RULES = {"fallback": 0, "subset": 1, "same": 2, "verb_only": 3, "noun_only": 4}  # the release's same_idx codes
PRIORITY = ("same", "subset", "verb_only", "noun_only")
LABEL_COLUMNS = ("video_id", "verbs", "nouns")


class LabelCsvError(ValueError):
  """A malformed label CSV; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class LabelPairs:
  indices: np.ndarray  # int32 (N, MAX_CANDIDATES): exo rows, candidates first, then repeats of the first
  counts: np.ndarray  # int32 (N,): how many of each row's entries are candidates to draw among
  rules: np.ndarray  # int8 (N,): the rule code of each row (RULES)


def _parse_ids(text: str, where: str, column: str, allow_empty: bool) -> frozenset[int]:
  try:
    ids = frozenset(int(t) for t in (text or "").replace(";", " ").split())
  except ValueError:
    raise LabelCsvError(f"{where}: column '{column}' must hold class ids separated by spaces, got '{text}'") from None
  if not ids and not allow_empty:
    raise LabelCsvError(f"{where}: column '{column}' is empty")
  return ids


def read_label_sets(csv_path: str, ids: Sequence[str],
                    allow_empty: bool = False) -> list[tuple[frozenset[int], frozenset[int]]]:
  """(verbs, nouns) per clip of `ids` (the narration CSV's order) from the CSV's `verbs` and `nouns` columns:
  class ids separated by spaces (or ';'), in one label space shared by the ego and exo files (the release
  maps LEMMA's classes to EPIC-100's). `allow_empty`: an empty set is allowed (exo clips whose classes
  have no ego counterpart); an ego clip needs labels."""
  sets = {}
  for _, where, fields in csv_rows.read_csv_rows(csv_path, LABEL_COLUMNS, LabelCsvError):
    video_id = (fields["video_id"] or "").strip()
    sets[video_id] = tuple(_parse_ids(fields[c], where, c, allow_empty) for c in ("verbs", "nouns"))
  return [sets[i] for i in ids]


def rule_of(ego: tuple[frozenset, frozenset], exo: tuple[frozenset, frozenset]) -> str | None:
  """The release's rule for one (ego, exo) pair of label sets, or None when no rule holds."""
  (ego_verbs, ego_nouns), (exo_verbs, exo_nouns) = ego, exo
  verbs_in, nouns_in = ego_verbs <= exo_verbs, ego_nouns <= exo_nouns
  if ego_verbs == exo_verbs and ego_nouns == exo_nouns:
    return "same"
  if verbs_in and nouns_in:
    return "subset"
  if verbs_in:
    return "verb_only"
  if nouns_in:
    return "noun_only"
  return None


def candidates(ego_sets, exo_sets) -> list[dict[str, list[int]]]:
  """Per ego clip, the first MAX_CANDIDATES exo rows of each rule, in exo order."""
  out = []
  for ego in progress.track(ego_sets, what="ego clips", desc="label rules"):
    found = {rule: [] for rule in PRIORITY}
    for j, exo in enumerate(exo_sets):
      rule = rule_of(ego, exo)
      if rule is not None and len(found[rule]) < MAX_CANDIDATES:
        found[rule].append(j)
    out.append(found)
  return out


def mine_label_pairs(ego_sets, exo_sets, seed: int = 0) -> LabelPairs:
  """The release's label rules for every ego clip (see the module docstring)."""
  found = candidates(ego_sets, exo_sets)
  subset_lists = [f["subset"] for f in found if f["subset"]]
  rng = np.random.default_rng(seed)
  indices = np.zeros((len(found), MAX_CANDIDATES), np.int32)
  counts = np.zeros((len(found),), np.int32)
  rules = np.zeros((len(found),), np.int8)
  for i, f in enumerate(found):
    rule = next((r for r in PRIORITY if f[r]), "fallback")
    if rule == "fallback":
      if not subset_lists:
        raise ValueError(f"ego clip {i} has no label candidate, and no ego clip has a 'subset' candidate for the "
                         "release's fallback to draw from")
      chosen = [int(lst[rng.integers(len(lst))]) for lst in (subset_lists[rng.integers(len(subset_lists))]
                                                              for _ in range(MAX_CANDIDATES))]
    else:
      chosen = f[rule]
    indices[i] = chosen + [chosen[0]] * (MAX_CANDIDATES - len(chosen))
    counts[i], rules[i] = len(chosen), RULES[rule]
  return LabelPairs(indices, counts, rules)


def rule_counts(rules: np.ndarray) -> dict[str, int]:
  """How many ego clips each rule paired."""
  return {name: int(np.sum(rules == code)) for name, code in RULES.items()}
