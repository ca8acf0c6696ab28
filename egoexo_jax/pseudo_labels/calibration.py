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
