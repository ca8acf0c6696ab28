"""Writes stand-in teacher files for data/manifest.csv, in the formats the Ego-Exo authors released.

    python data/make_pseudo_labels.py            # writes data/pseudo_labels/

Outputs (keys and file names follow the manifest `path` column exactly, like the released files):
  pseudo_labels/ego_logits.pkl     {path: float32[2]} (ego, exo) logits from the DECLARED `view` column:
                                   [2, -2] for ego, [-2, 2] for exo, plus a small deterministic
                                   per-video perturbation (normal, sd 0.3, seeded by the path's CRC32).
                                   No ego/exo classifier is involved.
  pseudo_labels/object_logits.pkl  {path: float32[1000]}: a STAND-IN for ImageNet-classifier logits, which
                                   cannot be computed offline here. It is NOT an ImageNet classifier: each
                                   frame's joint RGB colour histogram (8 x 8 x 8 bins) is averaged over all
                                   decoded frames, square-rooted, standardised, and mapped to 1000 values by
                                   a fixed random projection (numpy seed 0). Videos with similar colors
                                   get similar "object" distributions; the class indices mean nothing.
  pseudo_labels/hand_object/<path without extension>.npy
                                   per decoded frame of the original video, a pair (object_detections,
                                   hand_detections), each an N x 5 float32 array [x1, y1, x2, y2, score] in
                                   original pixels or None when nothing was found; saved with np.save as an
                                   object array of shape (frames, 2). Heuristic stand-ins for the 100DOH
                                   hand-object detector: hands are blobs of skin color (YCbCr thresholds),
                                   objects are the largest moving non-skin blob (frame difference). They
                                   are poor: faces, wood and yellow-orange things (the box in box.mp4)
                                   pass for hands, camera motion passes for an object, and the box in
                                   box.mp4 is never found as an object. Good enough to exercise the
                                   interaction-map code path, not to teach anything.

Segments of one video share its teacher values, as in the released per-video files. Needs only numpy,
scipy, Pillow and PyAV; deterministic (same inputs -> same bytes).
"""

import csv
import pathlib
import pickle
import zlib

import av
import numpy as np
from PIL import Image
from scipy import ndimage

DATA = pathlib.Path(__file__).resolve().parent
MANIFEST = DATA / "manifest.csv"
OUTPUT = DATA / "pseudo_labels"

EGO_LOGITS = {"ego": np.array([2.0, -2.0], np.float32), "exo": np.array([-2.0, 2.0], np.float32)}
EGO_PERTURBATION_SD = 0.3
NUM_OBJECT_CLASSES = 1000
HISTOGRAM_BINS = 8  # per channel; joint histogram of 8**3 bins
OBJECT_LOGIT_SCALE = 3.0
DETECTION_SHORT_SIDE = 120  # detectors run on frames downscaled to this short side
SKIN_CB = (77, 120)  # YCbCr skin thresholds: Chai and Ngan (1999), Cb tightened from 127
SKIN_CR = (138, 173)  # Cr tightened from 133 (the white tablecloth of box.mp4 passed)
MIN_BLOB_FRACTION = 0.01  # of the frame area
MAX_HANDS = 2
MOTION_THRESHOLD = 25  # grey-level difference between consecutive frames


def read_views(manifest: pathlib.Path) -> dict[str, str]:
  """{manifest path: declared view}, in manifest order; one view per video."""
  views = {}
  with open(manifest, newline="") as f:
    for line, row in enumerate(csv.DictReader(f), start=2):
      path, view = row["path"], row["view"]
      if view not in EGO_LOGITS:
        raise ValueError(f"{manifest}:{line}: view '{view}' is not one of {sorted(EGO_LOGITS)}")
      if views.setdefault(path, view) != view:
        raise ValueError(f"{manifest}:{line}: '{path}' is declared '{view}' here but '{views[path]}' before")
  return views


def decoded_frames(video: pathlib.Path):
  """Every decoded frame of stream 0, in decode order, as an RGB uint8 array."""
  with av.open(str(video)) as container:
    for frame in container.decode(video=0):
      yield frame.to_ndarray(format="rgb24")


def ego_logits(path: str, view: str) -> np.ndarray:
  rng = np.random.default_rng(zlib.crc32(path.encode()))
  return (EGO_LOGITS[view] + rng.normal(0.0, EGO_PERTURBATION_SD, 2)).astype(np.float32)


def color_histogram(rgb: np.ndarray) -> np.ndarray:
  """Joint RGB histogram, normalised to sum 1."""
  bins = (rgb // (256 // HISTOGRAM_BINS)).astype(np.int64)
  index = (bins[..., 0] * HISTOGRAM_BINS + bins[..., 1]) * HISTOGRAM_BINS + bins[..., 2]
  counts = np.bincount(index.ravel(), minlength=HISTOGRAM_BINS**3)
  return counts / counts.sum()


def object_logits(mean_histogram: np.ndarray, projection: np.ndarray) -> np.ndarray:
  """The stand-in "object" logits: a fixed random projection of the (square-rooted) histogram.

  The projection is linear, so this equals the average over frames of per-frame logits computed from
  standardised features of the average histogram.
  """
  feature = np.sqrt(mean_histogram)
  feature = (feature - feature.mean()) / (feature.std() + 1e-8)
  return (OBJECT_LOGIT_SCALE * projection @ feature / np.sqrt(len(feature))).astype(np.float32)


def blob_boxes(mask: np.ndarray, max_blobs: int, scale: float) -> np.ndarray | None:
  """Boxes [x1, y1, x2, y2, score] of the largest blobs of a mask, in original pixels.

  score = the fraction of the box covered by the blob (compact blobs score high).
  """
  labelled, count = ndimage.label(mask)
  if count == 0:
    return None
  areas = ndimage.sum_labels(mask, labelled, index=np.arange(1, count + 1))
  min_area = MIN_BLOB_FRACTION * mask.size
  extents = ndimage.find_objects(labelled)
  boxes = []
  for label in np.argsort(-areas, kind="stable")[:max_blobs] + 1:
    area = float(areas[label - 1])
    if area < min_area:
      break
    rows, cols = extents[label - 1]
    box_area = (rows.stop - rows.start) * (cols.stop - cols.start)
    boxes.append([cols.start / scale, rows.start / scale, cols.stop / scale, rows.stop / scale, area / box_area])
  return np.asarray(boxes, np.float32) if boxes else None


def detect(rgb: np.ndarray, previous_grey: np.ndarray | None):
  """(object_detections, hand_detections, grey) for one frame; detections are N x 5 or None."""
  scale = DETECTION_SHORT_SIDE / min(rgb.shape[:2])
  small = Image.fromarray(rgb).resize((round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                                      Image.Resampling.BILINEAR)
  ycbcr = np.asarray(small.convert("YCbCr"), np.int16)
  cb, cr = ycbcr[..., 1], ycbcr[..., 2]
  skin = (cb >= SKIN_CB[0]) & (cb <= SKIN_CB[1]) & (cr >= SKIN_CR[0]) & (cr <= SKIN_CR[1])
  skin = ndimage.binary_opening(skin, iterations=2)
  hands = blob_boxes(skin, MAX_HANDS, scale)

  grey = ndimage.uniform_filter(ycbcr[..., 0].astype(np.float32), size=3)
  objects = None
  if previous_grey is not None:
    moving = (np.abs(grey - previous_grey) > MOTION_THRESHOLD) & ~ndimage.binary_dilation(skin, iterations=2)
    objects = blob_boxes(ndimage.binary_opening(moving, iterations=1), 1, scale)
  return objects, hands, grey


def main() -> None:
  views = read_views(MANIFEST)
  projection = np.random.default_rng(0).standard_normal((NUM_OBJECT_CLASSES, HISTOGRAM_BINS**3))
  ego, objects = {}, {}
  for path, view in views.items():
    detections, histograms, previous = [], [], None
    for rgb in decoded_frames(DATA / path):
      histograms.append(color_histogram(rgb))
      object_dets, hand_dets, previous = detect(rgb, previous)
      detections.append((object_dets, hand_dets))
    ego[path] = ego_logits(path, view)
    objects[path] = object_logits(np.mean(histograms, axis=0), projection)

    per_frame = np.empty((len(detections), 2), dtype=object)
    for k, (object_dets, hand_dets) in enumerate(detections):
      per_frame[k, 0], per_frame[k, 1] = object_dets, hand_dets
    npy = OUTPUT / "hand_object" / (str(pathlib.PurePosixPath(path).with_suffix("")) + ".npy")
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, per_frame, allow_pickle=True)
    with_hands = sum(d[1] is not None for d in detections)
    with_objects = sum(d[0] is not None for d in detections)
    print(f"{path}: {len(detections)} frames, hands in {with_hands}, objects in {with_objects}")

  for name, table in (("ego_logits.pkl", ego), ("object_logits.pkl", objects)):
    with open(OUTPUT / name, "wb") as f:
      pickle.dump(table, f, protocol=4)
  print(f"wrote {OUTPUT}")


if __name__ == "__main__":
  main()
