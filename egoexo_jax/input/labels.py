"""One label encoder for every clip pipeline: a record's `labels` field -> the training target.

Heads are (name, classes) pairs in the order of a record's labels. Kinds:
  'single'       one class per head, in head order: int32 (H,). Each label is an id of its own head's
                 classes ([verb, noun] for SUM-L's (97, 300), [action] for Ego-Exo), or, with
                 `concatenated_ids`, an id of all heads' classes laid end to end (head i's classes follow
                 those of heads 0..i-1; EPIC-100 records store [verb, 97 + noun], annotations.py), whose
                 offsets are removed.
  'multi_label'  a set of class ids over the heads' classes laid end to end (Charades-Ego's 157; LEMMA
                 verbs then nouns): a float32 multi-hot (K_0 + K_1 + ...,).
A record whose labels do not fit raises ConfigMismatchError naming `where` (the record), the label and
the config key of the class counts; a training stream skips such a record (stream.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from egoexo_jax.input.stream import ConfigMismatchError

LABEL_KINDS = ("single", "multi_label")

Heads = tuple[tuple[str, int], ...]


def head_sizes(counts, layout: Sequence[str] = (), *, key: str, layout_key: str) -> Heads:
  """(head name, classes) in label order from a config's class counts `counts` (config `key`).

  counts: {head: classes}, ordered by `layout` (config `layout_key`; a config dict sorts its keys, so
  several heads need it). An int is one head named after `layout` (default 'action'); a sequence of ints
  is unnamed heads '0', '1', ... in that order.
  """
  if isinstance(counts, (int, np.integer)):
    counts = {(tuple(layout) or ("action",))[0]: int(counts)}
  elif not isinstance(counts, Mapping) and not hasattr(counts, "items"):
    counts = {str(i): int(n) for i, n in enumerate(counts)}
    layout = layout or tuple(counts)
  counts = dict(counts.items())
  if not layout:
    if len(counts) != 1:
      raise ValueError(f"config {key} names heads {sorted(counts)}; config {layout_key} must give their order "
                       "(the order of a record's labels)")
    layout = tuple(counts)
  layout = tuple(layout)
  if sorted(layout) != sorted(counts):
    raise ValueError(f"config {layout_key} {layout} and {key} {sorted(counts)} name different heads")
  return tuple((name, int(counts[name])) for name in layout)


def encode_labels(labels, heads: Heads, kind: str, where: str, *, concatenated_ids: bool = False,
                  key: str = "model.num_classes") -> np.ndarray:
  """A record's labels -> its target (module docstring); errors name `where` and the config `key`."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  if kind == "multi_label":
    total = sum(size for _, size in heads)
    if len(labels) and (labels.min() < 0 or labels.max() >= total):
      raise ConfigMismatchError(f"{where}: labels {labels.tolist()} are not all in [0, {total}) "
                                f"(config {key}: {dict(heads)})")
    target = np.zeros(total, np.float32)
    target[labels] = 1.0
    return target
  if kind != "single":
    raise ValueError(f"unknown label kind '{kind}': use one of {LABEL_KINDS}")
  if len(labels) != len(heads):
    if len(heads) == 1:
      raise ConfigMismatchError(f"{where}: field 'labels' holds {labels.tolist()}; 'single' labels need exactly "
                                f"one {heads[0][0]} label per video")
    raise ConfigMismatchError(f"{where}: field 'labels' holds {labels.tolist()}, but the config has {len(heads)} "
                              f"heads {[h for h, _ in heads]}: 'single' labels need one class per head, in that order")
  offset, out = 0, np.empty(len(heads), np.int32)
  for i, ((name, size), label) in enumerate(zip(heads, labels)):
    low = offset if concatenated_ids else 0
    if not low <= label < low + size:
      space = " of the concatenated class space" if concatenated_ids else ""
      raise ConfigMismatchError(f"{where}: label {label} of head {i} is outside [{low}, {low + size}), the "
                                f"'{name}' classes{space} (config {key})")
    out[i] = label - low
    offset += size
  return out
