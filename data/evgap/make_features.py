"""Writes the EVGAP stand-in feature set of data/evgap/ from the real clips in data/clips.

    python data/evgap/make_features.py        # rewrites data/evgap/features/, views.csv, segments.csv, split.csv

No real Assembly101 features can be had offline, so this makes a small set with the same SHAPE of
data: per-frame feature sequences, several time-synchronised views per recording, tagged ego or exo,
and per-frame action segments with verb and object labels. What each piece is:

  recordings  Each shipped clip is decoded (PyAV, every frame) and cut into consecutive pieces of at
              most MAX_RECORDING_FRAMES frames: 10 "recordings" (box 4, cup 2, tree 1, bikes 2,
              carphone 1), 1,110 frames in all.
  views       Five views of every frame, made from the SAME decoded frame, so they are synchronised by
              construction: ego_0 / ego_1 are tight crops (the centre half; the lower-centre 60%),
              exo_0 / exo_1 / exo_2 are the full frame, the full frame mirrored, and the top-left 80%.
              They are crops and flips, not cameras: "ego" and "exo" here are declared names.
  features    Per view and frame: the crop resized to 16 x 16 (PIL bilinear), RGB scaled to
              (x / 255 - 0.45) / 0.225, flattened (768 values), multiplied by a fixed Gaussian matrix
              (768 x FEATURE_DIM, numpy seed 0, entries N(0, 1 / 768)), then ReLU, stored float16.
              A fixed random projection, NOT a TSM network: FEATURE_DIM is 128 where Assembly101's TSM
              features have 2048, to keep the files small.
  verbs       From motion, per frame: the mean absolute grey-level difference to the previous frame
              (full frame at 32 x 32), smoothed over 15 frames, cut at the 1/3 and 2/3 quantiles of all
              frames into 0 "hold" / 1 "move" / 2 "move fast"; segments shorter than MIN_SEGMENT_FRAMES
              are merged into the one before (or after, at the start).
  objects     The clip's hand-declared class (data/classes.txt): 0 box, 1 cup, 2 tree, 3 street, 4 person.
  actions     action = 3 * object + verb (15 ids; actions.csv names them). Each frame has exactly one.
  split       recording -> train / val / test, fixed by hand below.

Everything is deterministic (same inputs -> same bytes). Needs numpy, Pillow and PyAV.
"""

import csv
import pathlib

import av
import numpy as np
from PIL import Image

DATA = pathlib.Path(__file__).resolve().parent
CLIPS = DATA.parent / "clips"
CLIP_OBJECTS = {"box.mp4": 0, "cup.mp4": 1, "tree.avi": 2, "bikes.mp4": 3, "carphone_pristine.mp4": 4}
OBJECTS = ("box", "cup", "tree", "street", "person")
VERBS = ("hold", "move", "move fast")
# view name -> (kind, crop as fractions (left, top, right, bottom), mirror)
VIEWS = {
    "ego_0": ("ego", (0.25, 0.25, 0.75, 0.75), False),
    "ego_1": ("ego", (0.2, 0.4, 0.8, 1.0), False),
    "exo_0": ("exo", (0.0, 0.0, 1.0, 1.0), False),
    "exo_1": ("exo", (0.0, 0.0, 1.0, 1.0), True),
    "exo_2": ("exo", (0.0, 0.0, 0.8, 0.8), False),
}
PIXELS = 16  # each view's crop is resized to PIXELS x PIXELS
FEATURE_DIM = 128
MAX_RECORDING_FRAMES = 128
MOTION_PIXELS = 32
MOTION_SMOOTHING = 15
MIN_SEGMENT_FRAMES = 10
SPLIT = {"box_r2": "val", "box_r3": "test", "cup_r1": "val", "bikes_r1": "test"}  # the rest: train


def decode(path: pathlib.Path) -> tuple[list[Image.Image], float]:
  """Every frame of a clip as RGB PIL images, and the stream's average frame rate."""
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate)
    frames = [frame.to_image() for frame in container.decode(video=0)]
  return frames, fps


def view_pixels(frame: Image.Image, crop: tuple[float, float, float, float], mirror: bool) -> np.ndarray:
  """One view of a frame: the crop, mirrored or not, at PIXELS^2, normalised; (PIXELS * PIXELS * 3,)."""
  width, height = frame.size
  box = (round(crop[0] * width), round(crop[1] * height), round(crop[2] * width), round(crop[3] * height))
  image = frame.crop(box).resize((PIXELS, PIXELS), Image.BILINEAR)
  if mirror:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return ((np.asarray(image, np.float32) / 255 - 0.45) / 0.225).ravel()


def motion_verbs(frames: list[Image.Image], cuts: tuple[float, float]) -> np.ndarray:
  """Per-frame verb ids from smoothed frame-difference energy cut at `cuts`."""
  return np.digitize(motion_energy(frames), cuts).astype(np.int64)


def motion_energy(frames: list[Image.Image]) -> np.ndarray:
  grey = np.stack([np.asarray(f.convert("L").resize((MOTION_PIXELS, MOTION_PIXELS), Image.BILINEAR), np.float32)
                   for f in frames])
  difference = np.concatenate([[0.0], np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))])
  difference[0] = difference[1] if len(difference) > 1 else 0.0
  kernel = np.ones(MOTION_SMOOTHING) / MOTION_SMOOTHING
  padded = np.pad(difference, MOTION_SMOOTHING // 2, mode="edge")
  return np.convolve(padded, kernel, mode="valid")


def merge_short_segments(labels: np.ndarray) -> np.ndarray:
  """Relabels runs shorter than MIN_SEGMENT_FRAMES with the label of the run before (the first run: after)."""
  labels = labels.copy()
  while True:
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    ends = np.r_[starts[1:], len(labels)]
    short = [i for i, (s, e) in enumerate(zip(starts, ends)) if e - s < MIN_SEGMENT_FRAMES]
    if not short or len(starts) == 1:
      return labels
    i = short[0]
    labels[starts[i]:ends[i]] = labels[starts[i - 1]] if i > 0 else labels[starts[1]]


def segments_of(labels: np.ndarray) -> list[tuple[int, int, int]]:
  """Runs of equal labels as (start_frame, end_frame exclusive, label)."""
  starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
  ends = np.r_[starts[1:], len(labels)]
  return [(int(s), int(e), int(labels[s])) for s, e in zip(starts, ends)]


def main():
  projection = np.random.default_rng(0).normal(0, 1 / np.sqrt(PIXELS * PIXELS * 3), (PIXELS * PIXELS * 3, FEATURE_DIM))
  decoded = {name: decode(CLIPS / name) for name in CLIP_OBJECTS}
  energy = np.concatenate([motion_energy(frames) for frames, _ in decoded.values()])
  cuts = tuple(np.quantile(energy, [1 / 3, 2 / 3]))

  features_dir = DATA / "features"
  view_rows, segment_rows, split_rows = [], [], []
  for name, (frames, fps) in decoded.items():
    stem = name.split(".")[0].split("_")[0]
    verbs = motion_verbs(frames, cuts)
    num_pieces = -(-len(frames) // MAX_RECORDING_FRAMES)
    bounds = np.linspace(0, len(frames), num_pieces + 1).round().astype(int)
    for piece, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
      recording = f"{stem}_r{piece}"
      for view, (kind, crop, mirror) in VIEWS.items():
        pixels = np.stack([view_pixels(frame, crop, mirror) for frame in frames[start:end]])
        features = np.maximum(pixels @ projection, 0).astype(np.float16)
        out = features_dir / recording / f"{view}.npy"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, features)
        view_rows.append([recording, view, kind, f"features/{recording}/{view}.npy", f"{fps:.4g}"])
      actions = 3 * CLIP_OBJECTS[name] + merge_short_segments(verbs[start:end])
      for s, e, action in segments_of(actions):
        segment_rows.append([recording, s, e, action, action % 3, action // 3])
      split_rows.append([recording, SPLIT.get(recording, "train")])

  def write(file, header, rows):
    with open(DATA / file, "w", newline="") as f:
      writer = csv.writer(f, lineterminator="\n")
      writer.writerow(header)
      writer.writerows(rows)

  write("views.csv", ["recording", "view", "kind", "path", "fps"], view_rows)
  write("segments.csv", ["recording", "start_frame", "end_frame", "action", "verb", "object"], segment_rows)
  write("split.csv", ["recording", "split"], split_rows)
  write("actions.csv", ["action", "verb", "object", "name"],
        [[3 * o + v, v, o, f"{VERBS[v]} {OBJECTS[o]}"] for o in range(len(OBJECTS)) for v in range(len(VERBS))])
  print(f"{len(split_rows)} recordings, {len(view_rows)} view files, {len(segment_rows)} segments; "
        f"verb cuts at motion {cuts[0]:.3f}, {cuts[1]:.3f}")


if __name__ == "__main__":
  main()
