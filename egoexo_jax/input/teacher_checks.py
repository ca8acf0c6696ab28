"""Write-time checks of detector boxes: the converter refuses or repairs them before they become records.

A detector row is [x1, y1, x2, y2, score, ...] in decoded-frame pixels. What is checked, and what
happens by default (refuse) or with `repair` (the converter's --repair_boxes):

| problem                        | default: refuse the video              | repair                             |
|--------------------------------|----------------------------------------|------------------------------------|
| a non-finite coordinate/score  | skipped, reason names file and frame   | the row is dropped                 |
| an inverted box (x2<x1, y2<y1) | skipped, reason names file and frame   | the row is dropped                 |
| a score outside [0, 1]         | skipped, reason names file and frame   | the score is clipped into [0, 1]   |
| corners outside the frame      | clipped onto the frame (always)        | clipped onto the frame             |

Why: a NaN box has no meaning to recover, and an inverted box usually means another box format
(x, y, w, h rows have x2 < x1 only when w < x), so swapping its corners would draw a wrong box: both
are dropped, never mended. A score above 1 (a logit, or a percentage) would become a map target above
1 (Ego-Exo's maps hold scores in [0, 1]; a target of 50 drove the interaction loss to -57), so it is
refused unless the user says clipping is right for their detector. Corners a few pixels outside the
frame are ordinary detector output and are clipped, as before. A refused video is skipped like an
undecodable one (counted, named, fatal under --strict); the converter's --min_fraction_written guard
stops a run where a box-format mismatch refuses most videos.
"""

from __future__ import annotations

import numpy as np


class BoxContentError(ValueError):
  """Detector rows that cannot be written as they are; the message names the file and the frame."""


def check_detections(detections: np.ndarray, where: str, repair: bool) -> tuple[np.ndarray, list[str]]:
  """(N, >=5) pixel detections -> (the rows to write, warnings about repairs); see the module table.

  `where` names the detector file and frame (e.g. 'dets/a.npy: frame 12'). Raises BoxContentError
  for the first problem unless `repair`.
  """
  coords, scores = detections[:, :4], detections[:, 4]
  problems = (
      (~np.all(np.isfinite(detections[:, :5]), axis=1), "a non-finite coordinate or score", "dropped"),
      ((coords[:, 2] < coords[:, 0]) | (coords[:, 3] < coords[:, 1]),
       "an inverted box (x2 < x1 or y2 < y1; another box format?)", "dropped"),
  )
  warnings, keep = [], np.ones(len(detections), bool)
  for bad, what, action in problems:
    bad = bad & keep
    if not bad.any():
      continue
    k = int(np.argmax(bad))
    message = f"{where}: {int(bad.sum())} detections with {what}, e.g. {detections[k, :5].tolist()}"
    if not repair:
      raise BoxContentError(message + "; pass --repair_boxes to drop such rows")
    warnings.append(f"{message}: {action}")
    keep &= ~bad
  detections = detections[keep]
  out_of_range = (detections[:, 4] < 0) | (detections[:, 4] > 1)
  if out_of_range.any():
    k = int(np.argmax(out_of_range))
    message = (f"{where}: {int(out_of_range.sum())} detections with a score outside [0, 1], e.g. "
               f"{float(detections[k, 4]):g}")
    if not repair:
      raise BoxContentError(message + " (a logit or a percentage?); pass --repair_boxes to clip scores into [0, 1]")
    warnings.append(message + ": clipped into [0, 1]")
    detections = detections.copy()
    detections[:, 4] = np.clip(detections[:, 4], 0.0, 1.0)
  return detections, warnings
