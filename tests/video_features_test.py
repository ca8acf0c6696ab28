"""Per-frame features from video records (input/video_features.py) against a tiny TSM applied by hand."""

import csv
import io

import jax
import numpy as np
import pytest
from PIL import Image

from egoexo_jax.input import feature_records, records, video_features
from egoexo_jax.models import backbones, import_weights

TINY_TSM = {"stage_blocks": [1, 1, 1, 1], "width": 4}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def jpeg_frames(rng, count, height=40, width=48):
  frames = []
  for _ in range(count):
    pixels = rng.integers(0, 256, size=(height // 4, width // 4, 3)).astype(np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)  # smooth: JPEG keeps it close
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    frames.append(out.getvalue())
  return frames


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("video_features")
  rng = np.random.default_rng(0)
  videos = {"AB12": jpeg_frames(rng, 11), "AB12EGO": jpeg_frames(rng, 9), "ZZ9": jpeg_frames(rng, 3)}
  with open(root / "videos.tfrecord-00000-of-00001", "wb") as f:
    for video_id, frames in videos.items():
      record = records.VideoRecord(video_id, fps=24.0, height=40, width=48, frames=frames,
                                   labels=np.zeros((1,), np.int64))
      records.write_tfrecord(f, records.encode_example(record))
  # Random weights (BatchNorm statistics included), saved as models/import_weights.py saves imported ones.
  module = backbones.build_backbone("tsm_r50", TINY_TSM, name=None)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, 8, 32, 32, 3), np.float32), train=False))
  draw = lambda shape: (0.3 * rng.normal(size=shape)).astype(np.float32)  # shapes only: nothing to compile
  variables = {"params": jax.tree.map(lambda x: draw(x.shape), shapes["params"]),
               "batch_stats": jax.tree.map(lambda x: 1 + np.abs(draw(x.shape)), shapes["batch_stats"])}
  import_weights.save_variables({"params": {"backbone": variables["params"]},
                                 "batch_stats": {"backbone": variables["batch_stats"]}}, str(root / "tsm"))
  return root, videos, module, variables


def by_hand(module, variables, frames, t, window=8, short_side=32):
  """Frame t's feature: frames t-4 .. t+3 (clamped), resized to short side 32, centre 32 x 32, normalised,
  the backbone, the mean over (t, h, w)."""
  indices = np.clip(np.arange(t - window // 2, t + window // 2), 0, len(frames) - 1)
  scale = short_side / 40  # 40 x 48 frames: 32 x 38.4, crop x from 3.2 to 35.2 -> stored x 4 .. 44
  box = (3.2 / scale, 0.0, 35.2 / scale, 40.0)
  clip = np.stack([np.asarray(Image.open(io.BytesIO(frames[i])).convert("RGB").resize((32, 32), Image.BILINEAR, box=box))
                   for i in indices])
  x = (clip.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  maps = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x[None])
  return np.asarray(maps[0][0]).mean(axis=(0, 1, 2))


def test_window_indices_clamp_at_both_ends():
  np.testing.assert_array_equal(video_features.window_indices(5, 4), [[0, 0, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3],
                                                                      [1, 2, 3, 4], [2, 3, 4, 4]])
  np.testing.assert_array_equal(video_features.window_indices(5, 2, frame_stride=2), [[0, 0], [1, 2], [3, 4]])


def test_extraction_matches_the_backbone_applied_by_hand_and_feeds_feature_records(inputs, tmp_path):
  root, videos, module, variables = inputs
  manifest = video_features.extract_records(
      str(root / "videos.tfrecord-*"), str(tmp_path / "out"), arch="tsm_r50", checkpoint=str(root / "tsm"),
      charades_ego_pairs=True, backbone_args=TINY_TSM, short_side=32, crop_size=32, mean=MEAN, std=STD,
      batch_windows=4)
  with open(manifest) as f:
    rows = list(csv.DictReader(f))
  # 'AB12EGO' is the ego view of recording 'AB12'; 'ZZ9' has no ego view and is left out of the manifest.
  assert [(r["recording"], r["view"], r["kind"], r["path"]) for r in rows] == [
      ("AB12", "exo", "exo", "AB12/exo.npy"), ("AB12", "ego", "ego", "AB12/ego.npy")]
  exo = np.load(tmp_path / "out" / "AB12" / "exo.npy")
  ego = np.load(tmp_path / "out" / "AB12" / "ego.npy")
  assert exo.shape == (11, 128) and ego.shape == (9, 128) and exo.dtype == np.float32  # res5: 32 x width 4
  for t in (0, 5, 10):  # both ends clamp; 10 sits in the last, padded batch of windows
    np.testing.assert_allclose(exo[t], by_hand(module, variables, videos["AB12"], t), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ego[3], by_hand(module, variables, videos["AB12EGO"], 3), rtol=1e-4, atol=1e-5)
  # The manifest converts into EVGAP feature records (the two views cut to the shorter's 9 frames).
  index = feature_records.convert_feature_manifest(manifest, str(tmp_path / "records"), dtype="float32",
                                                   max_length_difference=2)
  recording = feature_records.FeatureRecordSource(str(tmp_path / "records"))[0]
  assert index["num_records"] == 1 and recording.view_kinds == ["exo", "ego"] and recording.num_frames == 9
  np.testing.assert_array_equal(recording.features[1], ego)


def test_pairs_csv_names_the_views(inputs, tmp_path):
  root, _, _, _ = inputs
  (tmp_path / "pairs.csv").write_text("video_id,recording,view,kind\nZZ9,r1,top,exo\nAB12,r1,head,ego\n")
  manifest = video_features.extract_records(
      str(root / "videos.tfrecord-*"), str(tmp_path / "out"), arch="tsm_r50", checkpoint=str(root / "tsm"),
      views=video_features.read_pairs(str(tmp_path / "pairs.csv")), backbone_args=TINY_TSM, short_side=32,
      crop_size=32, window_frames=2, frame_stride=2)
  with open(manifest) as f:
    rows = [(r["recording"], r["view"], r["kind"], float(r["fps"])) for r in csv.DictReader(f)]
  assert rows == [("r1", "head", "ego", 12.0), ("r1", "top", "exo", 12.0)]  # every 2nd frame: 24 / 2 fps
  assert np.load(tmp_path / "out" / "r1" / "head.npy").shape == (6, 128)
  (tmp_path / "bad.csv").write_text("video_id,recording,view,kind\nZZ9,r1,top,side\n")
  with pytest.raises(video_features.VideoFeatureError, match="bad.csv:2: need non-empty"):
    video_features.read_pairs(str(tmp_path / "bad.csv"))
