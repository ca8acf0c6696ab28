"""Pictures of runs: arrays for TensorBoard (`writer.write_images`) and PNG files next to results.

Pure NumPy drawing where the picture is data (clips with overlays, timelines, similarity matrices) and
matplotlib (Agg, no display) where it needs axes or text (per-class AP, confusion matrix, SUM-L pairs).

- input_clip_images / write_input_clips: a few training clips, a few frames each, with the
  interaction-map targets tinted on them (hand red, object green) and the outline of each map's
  extent on that frame (the rasterised detector boxes' bounding rectangle).
- confusion_matrix / save_eval_pictures / save_eval_figures: evaluation's per-class AP or accuracy (bars,
  sorted) and the single-label confusion matrix (rows: true class, normalized per row), as PNG and JSON.
- timeline_image / save_segmentation: per-frame ground truth above prediction, one color per class;
  the predictions themselves as .npy.
- similarity_image / save_similarity: an ego x exo cosine-similarity matrix as a heat map.
- save_pair_examples: SUM-L pseudo-pairs, each ego narration with its mined exo narrations.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from egoexo_jax import atomic_files

HAND, OBJECT = (255, 60, 60), (60, 255, 60)  # overlay colors of the two interaction-map channels


# --------------------------------------------------------------------------- helpers


def _figure():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


def write_png(path: str, image: np.ndarray) -> str:
  """uint8 (H, W, 3) -> PNG at `path` (whole or not at all); returns the path."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_files.atomic_write(path, "wb") as f:
    Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG")
  return path


def write_json(path: str, content) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_files.atomic_write(path, "w") as f:
    json.dump(content, f, indent=1)
  return path


def _save_figure(pyplot, figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_files.atomic_write(path, "wb") as f:
    figure.savefig(f, format="png", dpi=100, bbox_inches="tight")
  pyplot.close(figure)
  return path


def class_colors(num_classes: int) -> np.ndarray:
  """uint8 (num_classes, 3): distinct hues around the color wheel (golden-angle steps)."""
  hue = (np.arange(num_classes) * 0.618033988749895) % 1.0
  k = (np.array([5.0, 3.0, 1.0])[None] + hue[:, None] * 6) % 6  # HSV -> RGB with s = 0.65, v = 0.95
  rgb = 0.95 - 0.95 * 0.65 * np.clip(np.minimum(k, 4 - k), 0, 1)
  return np.round(rgb * 255).astype(np.uint8)


# --------------------------------------------------------------------------- input clips


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w) -> (height, width), nearest cell."""
  rows = np.minimum(np.arange(height) * grid.shape[0] // height, grid.shape[0] - 1)
  cols = np.minimum(np.arange(width) * grid.shape[1] // width, grid.shape[1] - 1)
  return grid[rows][:, cols]


def _outline(image: np.ndarray, mask: np.ndarray, color) -> None:
  """Draws (in place) the bounding rectangle of `mask`'s True pixels, 1 pixel wide."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if rows.size == 0:
    return
  top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
  image[top, left:right + 1] = image[bottom, left:right + 1] = color
  image[top:bottom + 1, left] = image[top:bottom + 1, right] = color


def overlay_frame(frame: np.ndarray, maps: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
  """uint8 (H, W, 3) frame with a (h, w, 2) interaction map (hand, object) tinted on it and outlined."""
  image = np.asarray(frame, np.float32).copy()
  if maps is None:
    return image.astype(np.uint8)
  height, width = image.shape[:2]
  masks = []
  for channel, color in ((0, HAND), (1, OBJECT)):
    value = np.clip(_upsample(np.asarray(maps[..., channel], np.float32), height, width), 0, 1)[..., None]
    image = image * (1 - alpha * value) + np.asarray(color, np.float32) * alpha * value
    masks.append((value[..., 0] > 0, color))
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  for mask, color in masks:
    _outline(image, mask, color)
  return image


def input_clip_images(batch: Mapping[str, np.ndarray], max_clips: int = 4, frames_per_clip: int = 4) -> np.ndarray | None:
  """A host batch ('clips' uint8 (B, T, S, S, 3), optional 'interaction_map' (B, t, h, w, 2)) -> uint8
  (min(B, max_clips), S, frames_per_clip x S, 3): each clip's evenly spaced frames side by side, with the
  interaction map of the feature-grid time step each frame falls in. None when the batch has no clips."""
  clips = batch.get("clips")
  if clips is None:
    return None
  clips = np.asarray(clips)
  if clips.ndim != 5:  # e.g. EVGAP's feature windows: nothing to look at
    return None
  maps = batch.get("interaction_map")
  maps = None if maps is None else np.asarray(maps)
  num_frames = clips.shape[1]
  chosen = np.unique(np.linspace(0, num_frames - 1, min(frames_per_clip, num_frames)).round().astype(int))
  rows = []
  for b in range(min(len(clips), max_clips)):
    tiles = []
    for t in chosen:
      grid = None if maps is None else maps[b, min(t * maps.shape[1] // num_frames, maps.shape[1] - 1)]
      tiles.append(overlay_frame(clips[b, t], grid))
    rows.append(np.concatenate(tiles, axis=1))
  return np.stack(rows)


def write_input_clips(writer, step: int, batch: Mapping[str, np.ndarray], max_clips: int = 4) -> bool:
  """Writes input_clip_images of `batch` as TensorBoard images 'input/clips' at `step`; False when there
  are no clips in the batch."""
  images = input_clip_images(batch, max_clips)
  if images is None:
    return False
  writer.write_images(step, {"input/clips": images})
  return True


# --------------------------------------------------------------------------- evaluation


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 (C, C): [true, predicted] counts."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
  return matrix


def save_eval_pictures(prefix: str, *, per_class: Mapping[str, float], class_names: Sequence[str] | None = None,
                       labels: np.ndarray | None = None, scores: np.ndarray | None = None,
                       title: str = "") -> dict[str, str]:
  """`<prefix>per_class.png/.json` (per-class AP or accuracy, bars sorted high to low) and, for
  single-label `labels` (N,) with `scores` (N, C), `<prefix>confusion.png/.json` (row-normalized
  image; counts in the JSON). `per_class` maps class index (as str) or name -> value. Returns the paths."""
  pyplot = _figure()
  names = list(per_class)
  values = np.array([per_class[n] for n in names], np.float64)
  if class_names is not None:
    names = [class_names[int(n)] if str(n).isdigit() and int(n) < len(class_names) else str(n) for n in names]
  order = np.argsort(-np.nan_to_num(values, nan=-1))
  written = {"per_class_json": write_json(prefix + "per_class.json",  # null: undefined (no positives)
                                         {str(k): float(v) if np.isfinite(v) else None for k, v in per_class.items()})}
  figure, axes = pyplot.subplots(figsize=(max(4, 0.18 * len(names) + 1), 3))
  axes.bar(np.arange(len(names)), values[order], color="#4878d0")
  axes.set_xticks(np.arange(len(names)))
  axes.set_xticklabels([names[i] for i in order], rotation=90, fontsize=6)
  axes.set_ylim(0, 1)
  axes.set_ylabel("per class")
  axes.set_title(title or f"per-class values ({len(names)} classes, mean {np.nanmean(values):.3f})", fontsize=8)
  written["per_class_png"] = _save_figure(pyplot, figure, prefix + "per_class.png")
  if labels is not None and scores is not None and np.asarray(labels).ndim == 1:
    scores = np.asarray(scores)
    matrix = confusion_matrix(labels, scores.argmax(-1), scores.shape[-1])
    written["confusion_json"] = write_json(prefix + "confusion.json", {"rows": "true class", "columns": "predicted",
                                                                        "counts": matrix.tolist()})
    normalized = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    figure, axes = pyplot.subplots(figsize=(4.5, 4))
    shown = axes.imshow(normalized, cmap="viridis", vmin=0, vmax=1)
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # class indices
    axes.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"confusion matrix ({len(labels)} clips, rows sum to 1)", fontsize=8)
    figure.colorbar(shown)
    written["confusion_png"] = _save_figure(pyplot, figure, prefix + "confusion.png")
  return written


def save_eval_figures(prefix: str, scores: Mapping[str, np.ndarray], labels: np.ndarray, heads,
                      multi_label: bool) -> dict[str, str]:
  """evaluate's pictures from its aggregated scores {head: (N, K)} and labels ((N, K) 0/1 multi-label, or
  (N, H) one class per head): multi-label, per-class AP (evaluate.average_precision; NaN for classes
  without positives) in `<prefix>per_class.*`; single-label, per head, per-class accuracy (recall) and the
  confusion matrix in `<prefix><head>_per_class.*`, `<prefix><head>_confusion.*`. Returns the paths."""
  from egoexo_jax import evaluate  # pylint: disable=g-import-not-at-top  (evaluate imports the trainer)
  written = {}
  labels = np.asarray(labels)
  for i, (name, _) in enumerate(heads):
    head_scores = np.asarray(scores[name])
    if multi_label:
      ap = {str(k): evaluate.average_precision(labels[:, k], head_scores[:, k]) for k in range(labels.shape[1])}
      out = save_eval_pictures(prefix, per_class=ap, title=f"{name}: per-class AP, mAP {np.nanmean(list(ap.values())):.3f}")
    else:
      truth = labels[:, i]
      correct = head_scores.argmax(-1) == truth
      accuracy = {str(k): float(correct[truth == k].mean()) for k in np.unique(truth)}
      out = save_eval_pictures(f"{prefix}{name}_", per_class=accuracy, labels=truth, scores=head_scores,
                               title=f"{name}: per-class top-1 accuracy (classes present in the labels)")
    written.update({f"{name}_{k}": v for k, v in out.items()})
  return written


# --------------------------------------------------------------------------- segmentation


def timeline_image(truth: np.ndarray, prediction: np.ndarray, num_classes: int, width: int = 800,
                   band: int = 24, gap: int = 4) -> np.ndarray:
  """uint8 (2 x band + gap, width, 3): ground truth (top band) and prediction (bottom band), each frame's
  class as its color (class_colors), frames resampled to `width` columns."""
  truth, prediction = np.asarray(truth, np.int64), np.asarray(prediction, np.int64)
  if truth.shape != prediction.shape or truth.ndim != 1 or len(truth) == 0:
    raise ValueError(f"timeline needs two equal non-empty 1-D label sequences, got {truth.shape} and {prediction.shape}")
  colors = class_colors(num_classes)
  columns = np.minimum(np.arange(width) * len(truth) // width, len(truth) - 1)
  image = np.full((2 * band + gap, width, 3), 255, np.uint8)
  image[:band] = colors[np.clip(truth[columns], 0, num_classes - 1)][None]
  image[band + gap:] = colors[np.clip(prediction[columns], 0, num_classes - 1)][None]
  return image


def save_segmentation(output_dir: str, sequences: Sequence[tuple[str, np.ndarray, np.ndarray]],
                      num_classes: int) -> list[str]:
  """For each (name, truth, prediction): `<output_dir>/predictions/<name>.npy` (int32 per-frame classes)
  and `<output_dir>/timelines/<name>.png` (timeline_image). Returns the PNG paths."""
  paths = []
  for name, truth, prediction in sequences:
    safe = name.replace(os.sep, "_")
    target = os.path.join(output_dir, "predictions", safe + ".npy")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with atomic_files.atomic_write(target, "wb") as f:
      np.save(f, np.asarray(prediction, np.int32))
    paths.append(write_png(os.path.join(output_dir, "timelines", safe + ".png"),
                           timeline_image(truth, prediction, num_classes)))
  return paths


# --------------------------------------------------------------------------- similarity matrices


def similarity_image(ego: np.ndarray, exo: np.ndarray, cell: int = 8) -> np.ndarray:
  """uint8 (N x cell, M x cell, 3): cosine similarity of ego (N, D) and exo (M, D) rows, -1 blue .. 0 white
  .. +1 red; matching indices on the diagonal."""
  ego = np.asarray(ego, np.float64)
  exo = np.asarray(exo, np.float64)
  ego = ego / np.maximum(np.linalg.norm(ego, axis=1, keepdims=True), 1e-12)
  exo = exo / np.maximum(np.linalg.norm(exo, axis=1, keepdims=True), 1e-12)
  similarity = np.clip(ego @ exo.T, -1, 1)[..., None]
  white, red, blue = np.array([255.0] * 3), np.array([200.0, 30, 30]), np.array([30.0, 60, 200])
  image = np.where(similarity >= 0, white + (red - white) * similarity, white + (blue - white) * -similarity)
  return np.repeat(np.repeat(np.round(image).astype(np.uint8), cell, 0), cell, 1)


def save_similarity(path: str, ego: np.ndarray, exo: np.ndarray, max_rows: int = 64) -> str:
  """similarity_image of the first `max_rows` ego and exo rows, as PNG at `path`."""
  return write_png(path, similarity_image(ego[:max_rows], exo[:max_rows]))


# --------------------------------------------------------------------------- SUM-L pairs


def save_pair_examples(path: str, pairs, count: int = 8, per_ego: int = 3, seed: int = 0) -> str:
  """A PNG of `count` ego clips (evenly spread over the pair file) with their first `per_ego` mined exo
  clips: narration and cosine similarity of each. `pairs`: narration_pairs.PairFile."""
  pyplot = _figure()
  del seed  # evenly spread rows need no randomness
  rows = np.unique(np.linspace(0, len(pairs.ego_ids) - 1, min(count, len(pairs.ego_ids))).round().astype(int))
  lines = []
  for row in rows:
    lines.append((f"ego {pairs.ego_ids[row]}: {_short(pairs.ego_narrations[row])}", "black"))
    for j, similarity in list(zip(pairs.pair_indices[row], pairs.pair_similarities[row]))[:per_ego]:
      lines.append((f"    {similarity:+.2f}  exo {pairs.exo_ids[j]}: {_short(pairs.exo_narrations[j])}", "#2a5599"))
  figure = pyplot.figure(figsize=(9, 0.22 * len(lines) + 0.6))
  figure.text(0.01, 0.99, f"SUM-L pseudo-pairs ({pairs.model}): ego narration, then its mined exo clips with "
                          "cosine similarity", va="top", fontsize=8, weight="bold")
  for i, (text, color) in enumerate(lines):
    figure.text(0.01, 0.99 - (i + 1.3) / (len(lines) + 2), text, va="top", fontsize=7, color=color, family="monospace")
  return _save_figure(pyplot, figure, path)


def _short(text, limit: int = 80) -> str:
  text = str(text)
  return text if len(text) <= limit else text[:limit - 3] + "..."
