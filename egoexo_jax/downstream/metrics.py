"""Downstream metrics, in NumPy.

Temporal action segmentation (the MS-TCN / Assembly101 evaluation):
  - segments: maximal runs of one label; frames labelled in `ignore` (default -1, unlabelled) form no
    segment and are left out of the accuracy.
  - F1@k: predicted segments are taken in order; each is a true positive when its IoU with the
    best-overlapping ground-truth segment of the same label is >= k / 100 and that ground-truth segment
    has not been matched yet, else a false positive; unmatched ground-truth segments are false
    negatives. Counts are summed over all sequences, then F1 = 2 P R / (P + R), in percent.
  - Edit: 100 (1 - Levenshtein(predicted labels, true labels) / max(lengths)) over the segment label
    sequences, averaged over sequences.
  - Accuracy: percent of labelled frames predicted right, over all sequences' frames.
Anticipation (EPIC-Kitchens / Assembly101): class-mean top-k recall: for each class present in the
ground truth, the fraction of its examples whose top-k predictions contain it; the mean over those
classes, in percent.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

F1_OVERLAPS = (0.10, 0.25, 0.50)


def segments(labels: np.ndarray, ignore: Iterable[int] = (-1,)) -> list[tuple[int, int, int]]:
  """(label, start, end exclusive) of each run of equal labels, without runs of ignored labels."""
  labels = np.asarray(labels)
  if not len(labels):
    return []
  starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
  ends = np.r_[starts[1:], len(labels)]
  ignore = set(ignore)
  return [(int(labels[s]), int(s), int(e)) for s, e in zip(starts, ends) if int(labels[s]) not in ignore]


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
  """Edit distance (insertions, deletions, substitutions of cost 1) between two label sequences."""
  row = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    previous, row[0] = row[0], i
    for j, y in enumerate(b, 1):
      previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
  return row[-1]


def edit_score(predicted: np.ndarray, truth: np.ndarray, ignore: Iterable[int] = (-1,)) -> float:
  p = [s[0] for s in segments(predicted, ignore)]
  t = [s[0] for s in segments(truth, ignore)]
  if not p and not t:
    return 100.0
  return 100.0 * (1 - levenshtein(p, t) / max(len(p), len(t)))


def overlap_counts(predicted: np.ndarray, truth: np.ndarray, overlap: float,
                   ignore: Iterable[int] = (-1,)) -> tuple[int, int, int]:
  """(true positives, false positives, false negatives) of predicted segments at IoU >= overlap."""
  pred, true = segments(predicted, ignore), segments(truth, ignore)
  matched = np.zeros(len(true), bool)
  tp = fp = 0
  for label, start, end in pred:
    best, best_iou = -1, -1.0
    for j, (true_label, true_start, true_end) in enumerate(true):
      if true_label != label:
        continue
      intersection = max(0, min(end, true_end) - max(start, true_start))
      iou = intersection / (max(end, true_end) - min(start, true_start))
      if iou > best_iou:
        best, best_iou = j, iou
    if best >= 0 and best_iou >= overlap and not matched[best]:
      tp += 1
      matched[best] = True
    else:
      fp += 1
  return tp, fp, int(len(true) - matched.sum())


def segmentation_scores(predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                        ignore: Iterable[int] = (-1,)) -> dict[str, float]:
  """F1@10/25/50, edit and accuracy (all percent) over sequences of per-frame labels."""
  ignore = tuple(ignore)
  scores = {}
  for overlap in F1_OVERLAPS:
    tp = fp = fn = 0
    for p, t in zip(predictions, truths):
      a, b, c = overlap_counts(p, t, overlap, ignore)
      tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    scores[f"f1@{int(round(overlap * 100))}"] = 100.0 * f1
  scores["edit"] = float(np.mean([edit_score(p, t, ignore) for p, t in zip(predictions, truths)]))
  labelled = [(np.asarray(p), np.asarray(t)) for p, t in zip(predictions, truths)]
  correct = sum(int(((p == t) & ~np.isin(t, ignore)).sum()) for p, t in labelled)
  total = sum(int((~np.isin(t, ignore)).sum()) for _, t in labelled)
  scores["accuracy"] = 100.0 * correct / max(total, 1)
  return scores


def class_mean_top_k_recall(scores: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
  """scores (S, K), labels (S,) -> mean over classes present in `labels` of top-k recall, in percent."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  hit = (top == labels[:, None]).any(axis=1)
  return 100.0 * float(np.mean([hit[labels == c].mean() for c in np.unique(labels)]))
