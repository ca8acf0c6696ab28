"""The metrics of multi-view testing (egoexo_jax/evaluate.py), as plain NumPy functions of scores and labels.

Metrics (fractions in [0, 1]):
  multi-label  mAP: per class, average precision exactly as sklearn's average_precision_score
               (AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds), averaged over the
               classes with at least one positive (PySlowFast's get_map drops the others).
  per head     top-1 / top-5 of each head. With heads 'verb' and 'noun', also 'action': top-1 is right
               when both are; top-5 ranks the verb x noun pairs by p(verb) p(noun), as the EPIC-Kitchens
               evaluation does (it multiplies the softmaxed verb and noun scores).
Per class (`per_class` in the JSON, `per_class_metrics`), for each head and class k: `count` (records with
k among their labels), `ap` (average precision of the head's scores for k, one class against the rest; null
without a positive) and, for single-label heads, `top1` / `top5` (share of class-k records whose class is
among the 1 / 5 highest scores: the per-class recall behind EPIC's class-mean numbers).
"""

from __future__ import annotations

import numpy as np


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
  """AP of one class: labels (N,) 0/1, scores (N,); sum over the distinct thresholds t (high to low) of
  (recall(t) - recall(previous t)) * precision(t). NaN when there is no positive."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  sorted_scores, hits = np.asarray(scores, np.float64)[order], np.asarray(labels, np.float64)[order]
  if hits.sum() == 0:
    return float("nan")
  last_of_threshold = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(hits) - 1]
  true_positives = np.cumsum(hits)[last_of_threshold]
  precision = true_positives / (last_of_threshold + 1)
  recall = true_positives / true_positives[-1]
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
  """(mAP over the classes with a positive, per-class AP (K,) with NaN for the others); labels and
  scores (N, K)."""
  per_class = np.array([average_precision(labels[:, k], scores[:, k]) for k in range(labels.shape[1])])
  if np.all(np.isnan(per_class)):
    raise ValueError("no class has a positive example: mAP is undefined")
  return float(np.nanmean(per_class)), per_class


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
  """{k: share of rows whose label is among the k highest scores}; scores (N, K), labels (N,)."""
  ranked = np.argsort(-scores, axis=1, kind="stable")
  return {k: float(np.mean(np.any(ranked[:, :k] == labels[:, None], axis=1))) for k in ks}


def action_top_k_accuracy(verb_scores: np.ndarray, noun_scores: np.ndarray, verb_labels: np.ndarray,
                          noun_labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
  """{k: share of segments whose (verb, noun) pair is among the k pairs of highest p(verb) p(noun)}.

  Scores are probabilities (N, V) and (N, M). Only the top-k verbs and nouns can form a top-k pair
  (a pair outside them is beaten by k pairs), so k x k candidates per segment decide it exactly.
  """
  out = {}
  for k in ks:
    top_verbs = np.argsort(-verb_scores, axis=1, kind="stable")[:, :k]
    top_nouns = np.argsort(-noun_scores, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(verb_scores))[:, None]
    pair_scores = (verb_scores[rows, top_verbs][:, :, None] * noun_scores[rows, top_nouns][:, None, :])
    best = np.argsort(-pair_scores.reshape(len(verb_scores), -1), axis=1, kind="stable")[:, :k]
    verbs, nouns = top_verbs[rows, best // top_nouns.shape[1]], top_nouns[rows, best % top_nouns.shape[1]]
    hit = (verbs == verb_labels[:, None]) & (nouns == noun_labels[:, None])
    out[k] = float(np.mean(np.any(hit, axis=1)))
  return out


def aggregate_views(view_scores: np.ndarray, method: str) -> np.ndarray:
  """(N, V, K) per-view scores -> (N, K): 'max' or 'mean' over the V views."""
  if method == "max":
    return view_scores.max(axis=1)
  if method == "mean":
    return view_scores.mean(axis=1)
  raise ValueError(f"unknown config eval.ensemble '{method}': use 'max' or 'mean'")


def compute_metrics(scores: dict[str, np.ndarray], labels: np.ndarray, heads, multi_label: bool) -> dict:
  """The metrics of the module docstring from aggregated scores {head: (N, K)} and the labels:
  (N, K) 0/1 for multi-label, (N, H) per head."""
  if multi_label:
    (name, _), = heads
    mean_ap, per_class = mean_average_precision(labels, scores[name])
    return {"mAP": mean_ap, "num_classes_with_positives": int(np.sum(~np.isnan(per_class)))}
  metrics = {}
  for i, (name, _) in enumerate(heads):
    for k, value in top_k_accuracy(scores[name], labels[:, i]).items():
      metrics[f"{name}_top{k}"] = value
  names = [name for name, _ in heads]
  if {"verb", "noun"} <= set(names):
    v, n = names.index("verb"), names.index("noun")
    for k, value in action_top_k_accuracy(scores["verb"], scores["noun"], labels[:, v], labels[:, n]).items():
      metrics[f"action_top{k}"] = value
  return metrics


def per_class_metrics(scores: dict[str, np.ndarray], labels: np.ndarray, heads, multi_label: bool) -> dict:
  """{head: {'count', 'ap', ['top1', 'top5']}: lists over the head's classes} (module docstring); NaN -> None."""
  def listed(values):
    return [None if np.isnan(v) else float(v) for v in values]

  out = {}
  for i, (name, size) in enumerate(heads):
    head_scores = scores[name]
    if multi_label:
      hot = np.asarray(labels, np.float64)
    else:
      hot = np.zeros((len(labels), size))
      hot[np.arange(len(labels)), labels[:, i]] = 1
    entry = {"count": [int(c) for c in hot.sum(axis=0)],
             "ap": listed([average_precision(hot[:, k], head_scores[:, k]) for k in range(size)])}
    if not multi_label:
      ranked = np.argsort(-head_scores, axis=1, kind="stable")
      for k in (1, 5):
        hit = np.any(ranked[:, :k] == labels[:, i:i + 1], axis=1)
        entry[f"top{k}"] = listed([hit[labels[:, i] == c].mean() if np.any(labels[:, i] == c) else np.nan
                                   for c in range(size)])
    out[name] = entry
  return out
