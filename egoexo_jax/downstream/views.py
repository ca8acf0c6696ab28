"""View selection of the downstream tasks: single views, two-view (fused) inputs, the novel-view protocol.

A view spec is a view name ('ego_0') or two or more joined by '+' ('ego_0+exo_1'): a two-view input, the
views' per-frame features concatenated on the channel axis frame by frame (frame t of every view of a
recording is the same moment), cut to the shortest view. This is our reading of EVGAP's two-view TAS
(Table 1, inputs from two viewpoints): one ego and one exo view of the same recording seen together;
with the fine-tuned encoder each view is encoded separately by the shared encoder and the encodings
concatenated (encoder_stack.py). Every spec of one run must fuse the same number of views.

Novel views: train (and validate) on some specs, test on a spec never trained on.

View kinds for the results table: a view is 'ego' or 'exo' by its name's prefix (data/evgap names
ego_0, exo_2) or by a manifest `recording,view,kind,...` (feature_records' view manifest); Assembly101's
head-mounted cameras are named HMC_*, its fixed ones C1*.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from egoexo_jax.downstream import annotations
from egoexo_jax.input import csv_rows


def parse(spec: str) -> list[str]:
  views = [v.strip() for v in spec.split("+")]
  if not all(views) or len(set(views)) != len(views):
    raise annotations.AnnotationError(f"bad view spec '{spec}': use view or view_a+view_b (distinct names)")
  return views


def num_views(specs: Iterable[str]) -> int:
  """The views per input shared by `specs` (1 when empty: all single views)."""
  counts = {len(parse(s)) for s in specs} or {1}
  if len(counts) != 1:
    raise annotations.AnnotationError(f"view specs {list(specs)} mix inputs of {sorted(counts)} views")
  return counts.pop()


def load(features_dir: str, segments: dict, recordings: Sequence[str], specs: Sequence[str] = ()
         ) -> list[annotations.ViewSequence]:
  """annotations.load_sequences for single views, fused sequences (view 'a+b') for two-view specs."""
  if all(len(parse(s)) == 1 for s in specs):
    return annotations.load_sequences(features_dir, segments, recordings, specs)
  num_views(specs)
  fused = []
  for spec in specs:
    parts = [annotations.load_sequences(features_dir, segments, recordings, [view]) for view in parse(spec)]
    for sequences in zip(*parts):
      frames = min(len(s.features) for s in sequences)
      features = np.concatenate([s.features[:frames] for s in sequences], axis=1)
      fused.append(annotations.ViewSequence(sequences[0].recording, spec, features, sequences[0].segments))
  return fused


def read_kinds(manifest: str) -> dict[str, str]:
  """{view: kind} from a view manifest (recording,view,kind,...); a view of two kinds is an error."""
  kinds: dict[str, str] = {}
  for _, where, fields in csv_rows.read_csv_rows(manifest, ("view", "kind"), annotations.AnnotationError):
    view, kind = fields["view"].strip(), fields["kind"].strip()
    if kinds.setdefault(view, kind) != kind:
      raise annotations.AnnotationError(f"{where}: view '{view}' is '{kind}' here but '{kinds[view]}' before")
  return kinds


def kind(view: str, kinds: dict[str, str] | None = None) -> str:
  if kinds and view in kinds:
    return kinds[view]
  if view.startswith(("ego", "HMC_")):
    return "ego"
  if view.startswith(("exo", "C1")):
    return "exo"
  raise annotations.AnnotationError(f"cannot tell whether view '{view}' is ego or exo: pass a view manifest")


def split_name(specs: Sequence[str], kinds: dict[str, str] | None = None) -> str:
  """'ego', 'exo' (every input one view of that kind), 'ego+exo' (two-view inputs of both kinds) or
  'ego & exo' (single views of both kinds)."""
  spec_kinds = [sorted({kind(v, kinds) for v in parse(s)}) for s in specs]
  if all(len(parse(s)) > 1 for s in specs):
    joined = {"+".join(k) for k in spec_kinds}
    return joined.pop() if len(joined) == 1 else "mixed"
  flat = {k for ks in spec_kinds for k in ks}
  return flat.pop() if len(flat) == 1 else "ego & exo"
