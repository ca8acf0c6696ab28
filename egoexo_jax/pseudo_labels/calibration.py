"""SUM-L's narration threshold and sigma carried from one text encoder to another.

SUM-L's threshold (0.5) and sigma (0.1) were set for the release's encoder
(paraphrase-multilingual-MiniLM-L12-v2). Another encoder (ours ships all-MiniLM-L6-v2) spreads cosine
similarities differently, so the same numbers select other pairs and weigh them otherwise. Given the top-1
similarities of the same ego clips mined with both encoders (reference and target):

  threshold  keep the same fraction of pseudo-pairs: with n the number of reference similarities above the
             reference threshold, the target threshold is the midpoint between the n-th and (n+1)-th largest
             target similarities (between the largest and 1 when n = 0, the smallest and -1 when n = all),
             so that exactly n target similarities lie above it (fewer where target values tie there).
  sigma      keep the same weights w_i = exp(s_i / sigma) / mean_j exp(s_j / sigma) on the kept pairs: an
             affine change s' = a s + b leaves w unchanged when sigma' = a sigma (b cancels in the
             normalisation), so sigma' = sigma x std(kept target similarities) / std(kept reference ones).

`python -m egoexo_jax.pseudo_labels.narration_pairs ... --reference_model=<the release's encoder>` embeds the
same narrations with both encoders and prints both values.

Without the release's encoder (it does not ship offline), the threshold is calibrated against the released
label rules instead (label_rule_curve): the threshold whose kept pairs best match (highest F1) the pairs
sharing verb and noun. `python -m egoexo_jax.pseudo_labels.calibration --annotations=EPIC_100_validation.csv`
(epic-kitchens-100-annotations) prints that curve; the value it gives for all-MiniLM-L6-v2 is in
configs/recipe_suml.py (row 'narration similarity threshold') and README 'SUM-L recipe'.
"""

from __future__ import annotations

import numpy as np


def _similarities(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0 or not np.all(np.isfinite(values)):
    raise ValueError(f"{name}: need finite similarities, got {values.size} values")
  return values


def matched_threshold(reference, reference_threshold: float, target) -> float:
  """The target threshold that keeps as many pairs as `reference_threshold` keeps of `reference`."""
  reference, target = _similarities("reference", reference), _similarities("target", target)
  if reference.shape != target.shape:
    raise ValueError(f"reference and target hold {reference.size} and {target.size} similarities; "
                     "they must be the same ego clips")
  kept = int(np.sum(reference > reference_threshold))
  ranked = np.sort(target)[::-1]
  upper = ranked[kept - 1] if kept else 1.0
  lower = ranked[kept] if kept < ranked.size else -1.0
  return float((upper + lower) / 2)


def matched_sigma(reference, reference_threshold: float, reference_sigma: float, target,
                  target_threshold: float) -> float:
  """sigma for the target encoder: reference_sigma scaled by the ratio of the kept similarities' spreads."""
  reference, target = _similarities("reference", reference), _similarities("target", target)
  kept_reference = reference[reference > reference_threshold]
  kept_target = target[target > target_threshold]
  if min(kept_reference.size, kept_target.size) < 2 or np.std(kept_reference) == 0:
    raise ValueError(f"sigma needs at least 2 distinct kept similarities per encoder; kept {kept_reference.size} "
                     f"reference and {kept_target.size} target pairs")
  return float(reference_sigma * np.std(kept_target) / np.std(kept_reference))


def format_calibration(reference_name: str, target_name: str, reference, reference_threshold: float,
                       reference_sigma: float, target) -> str:
  """The derived threshold and sigma with the numbers they come from, as the command line prints them."""
  threshold = matched_threshold(reference, reference_threshold, target)
  kept = int(np.sum(np.asarray(reference) > reference_threshold))
  lines = [f"calibration: {reference_name} keeps {kept}/{np.size(reference)} top-1 pairs above "
           f"{reference_threshold:g}; {target_name} keeps the same number above {threshold:.4f}"]
  try:
    sigma = matched_sigma(reference, reference_threshold, reference_sigma, target, threshold)
    lines.append(f"calibration: sigma {reference_sigma:g} for {reference_name} -> {sigma:.4f} for {target_name}")
  except ValueError as e:
    lines.append(f"calibration: sigma not derived ({e})")
  return "\n".join(lines)


# --------------------------------------------------------------------------- against the released label rules


def label_rule_curve(similarities, same_labels, thresholds) -> dict[str, np.ndarray]:
  """Precision, recall and F1 of the pairs a threshold keeps (similarity > t) against the pairs the released
  label rules pair ('same' verb and noun: label_pairs.rule_of), over all (ego, exo) pairs, at each threshold.

  This calibrates without the release's encoder: the rules are encoder-independent, and the threshold whose
  pair set best matches theirs (the highest F1) is the one for the encoder at hand. similarities (N, M)
  cosines, same_labels (N, M) bool. A threshold keeping nothing has precision 0 (by convention)."""
  similarities = _similarities("similarities", similarities).reshape(np.shape(same_labels))
  truth = np.asarray(same_labels, bool)
  if not truth.any():
    raise ValueError("no (ego, exo) pair shares its verb and noun: the label rules give nothing to match")
  order = np.argsort(-similarities.ravel(), kind="stable")
  ranked, hits = similarities.ravel()[order], np.cumsum(truth.ravel()[order])
  thresholds = np.asarray(thresholds, np.float64)
  kept = np.searchsorted(-ranked, -thresholds, side="left")  # how many similarities are > t
  true_kept = np.where(kept > 0, hits[np.maximum(kept - 1, 0)], 0)
  precision = np.where(kept > 0, true_kept / np.maximum(kept, 1), 0.0)
  recall = true_kept / truth.sum()
  f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
  return {"threshold": thresholds, "kept": kept, "precision": precision, "recall": recall, "f1": f1}


def label_rule_calibration(annotations_csv: str, ego_clips: int = 1500, exo_clips: int = 3000, seed: int = 0,
                           model_name: str | None = None, thresholds=np.arange(0.30, 0.951, 0.005)) -> dict:
  """The curve of `label_rule_curve` on EPIC-100 style annotations (narration, participant_id, verb_class,
  noun_class): the participants split in two (every other one, sorted: the 'ego' pool, the rest 'exo'),
  `ego_clips` and `exo_clips` drawn from each with a seeded generator, narrations embedded with the text
  encoder (`model_name`, None: the shipped one), and the threshold of the highest F1 ('best')."""
  import csv  # pylint: disable=g-import-not-at-top
  from egoexo_jax.pseudo_labels import narration_pairs  # pylint: disable=g-import-not-at-top
  with open(annotations_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  missing = {"narration", "participant_id", "verb_class", "noun_class"} - set(rows[0] if rows else ())
  if missing:
    raise ValueError(f"{annotations_csv}: no rows or missing columns {sorted(missing)}")
  participants = sorted({r["participant_id"] for r in rows})
  ego_people = set(participants[::2])
  rng = np.random.default_rng(seed)
  pools = []
  for pool, count in (([r for r in rows if r["participant_id"] in ego_people], ego_clips),
                      ([r for r in rows if r["participant_id"] not in ego_people], exo_clips)):
    pools.append([pool[i] for i in sorted(rng.choice(len(pool), min(count, len(pool)), replace=False))])
  model = narration_pairs.load_text_model(model_name)
  embeddings = []
  for pool in pools:
    e = narration_pairs.embed(model, [r["narration"] for r in pool], show_progress_bar=False).astype(np.float64)
    embeddings.append(e / np.linalg.norm(e, axis=1, keepdims=True))
  labels = [np.array([(int(r["verb_class"]), int(r["noun_class"])) for r in pool]) for pool in pools]
  same = np.all(labels[0][:, None, :] == labels[1][None, :, :], axis=-1)  # label_pairs rule 'same' (one verb, one noun)
  curve = label_rule_curve(embeddings[0] @ embeddings[1].T, same, thresholds)
  best = int(np.argmax(curve["f1"]))
  return {**curve, "best": float(np.round(curve["threshold"][best], 4)), "pairs": same.size,
          "same_pairs": int(same.sum()), "ego_clips": len(pools[0]), "exo_clips": len(pools[1])}


def main(argv):
  """python -m egoexo_jax.pseudo_labels.calibration --annotations=EPIC_100_validation.csv [--model=...]"""
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  result = label_rule_calibration(f.annotations, f.ego_clips, f.exo_clips, f.seed, f.model or None)
  print(f"{result['ego_clips']} ego x {result['exo_clips']} exo clips; {result['same_pairs']} of {result['pairs']} "
        "pairs share verb and noun (label rule 'same')")
  for i in range(0, len(result["threshold"]), 5):
    print(f"threshold {result['threshold'][i]:.3f}  kept {result['kept'][i]:8d}  precision "
          f"{result['precision'][i]:.3f}  recall {result['recall'][i]:.3f}  F1 {result['f1'][i]:.3f}")
  print(f"best F1 at threshold {result['best']:.3f}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("annotations", None, "EPIC-100 annotation CSV (e.g. EPIC_100_validation.csv).", required=True)
  flags.DEFINE_integer("ego_clips", 1500, "Clips drawn from the 'ego' half of the participants.")
  flags.DEFINE_integer("exo_clips", 3000, "Clips drawn from the other half.")
  flags.DEFINE_integer("seed", 0, "Seed of the draw.")
  flags.DEFINE_string("model", "", "Text encoder (default: the shipped all-MiniLM-L6-v2).")
  app.run(main)
