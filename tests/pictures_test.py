"""egoexo_jax/pictures.py: pixels of the overlays, timelines and heat maps by hand; files and event images."""

import json

import numpy as np
import pytest
from PIL import Image

from egoexo_jax import pictures
from egoexo_jax.pseudo_labels import narration_pairs


def clip_batch():
  """2 clips of 4 frames 8 x 8, grey level 100; a (2, 2, 2, 2) interaction-map grid: clip 0's hand map has
  its top-left cell on in time step 0, its object map the bottom-right cell in time step 1."""
  clips = np.full((2, 4, 8, 8, 3), 100, np.uint8)
  maps = np.zeros((2, 2, 2, 2, 2), np.float32)
  maps[0, 0, 0, 0, 0] = 1.0
  maps[0, 1, 1, 1, 1] = 1.0
  return {"clips": clips, "interaction_map": maps, "labels": np.zeros(2, np.int32)}


def test_input_clip_images_tint_and_outline_the_maps():
  images = pictures.input_clip_images(clip_batch(), max_clips=4, frames_per_clip=4)
  assert images.shape == (2, 8, 4 * 8, 3) and images.dtype == np.uint8
  # Frames 0 and 1 fall in map time step 0 (4 frames over 2 steps): the hand cell, pixels 0..3 x 0..3.
  tinted = np.round(100 * (1 - 0.45) + np.array(pictures.HAND) * 0.45)
  np.testing.assert_array_equal(images[0, 1, 1], tinted)  # inside the cell, off its outline
  np.testing.assert_array_equal(images[0, 0, 0], pictures.HAND)  # the outline's corner
  np.testing.assert_array_equal(images[0, 3, 3], pictures.HAND)
  np.testing.assert_array_equal(images[0, 5, 5], [100, 100, 100])  # outside the maps
  # Frame 2 (third tile) is in time step 1: the object cell, bottom right.
  np.testing.assert_array_equal(images[0, 7, 2 * 8 + 7], pictures.OBJECT)
  np.testing.assert_array_equal(images[0, 0, 2 * 8], [100, 100, 100])
  assert np.all(images[1] == 100)  # clip 1 has no map cells on
  assert pictures.input_clip_images({"ego_features": np.zeros((2, 8, 16))}) is None


def test_write_input_clips_puts_an_image_in_the_event_file(tmp_path):
  from clu import metric_writers
  from tensorboard.backend.event_processing import event_accumulator
  writer = metric_writers.SummaryWriter(str(tmp_path))
  assert pictures.write_input_clips(writer, 1, clip_batch())
  writer.flush()
  accumulator = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  accumulator.Reload()
  event = accumulator.Tensors("input/clips")[0]
  width, height, *pngs = event.tensor_proto.string_val
  assert event.step == 1 and (int(width), int(height)) == (32, 8) and len(pngs) == 2


def test_confusion_matrix_and_eval_pictures(tmp_path):
  labels = np.array([0, 0, 1, 2, 2, 2])
  scores = np.array([[.9, .1, 0], [.2, .7, .1], [0, 1, 0], [0, 0, 1], [.5, .1, .4], [0, .2, .8]])
  want = np.zeros((3, 3), int)
  for true, predicted in zip(labels, scores.argmax(1)):
    want[true, predicted] += 1
  np.testing.assert_array_equal(pictures.confusion_matrix(labels, scores.argmax(1), 3), want)
  written = pictures.save_eval_pictures(str(tmp_path / "eval_"), per_class={"0": 0.5, "1": 1.0, "2": 0.25},
                                        class_names=["cut", "wash", "stir"], labels=labels, scores=scores)
  assert sorted(written) == ["confusion_json", "confusion_png", "per_class_json", "per_class_png"]
  assert json.loads((tmp_path / "eval_per_class.json").read_text()) == {"0": 0.5, "1": 1.0, "2": 0.25}
  assert json.loads((tmp_path / "eval_confusion.json").read_text())["counts"] == want.tolist()
  for name in ("eval_per_class.png", "eval_confusion.png"):
    with Image.open(tmp_path / name) as image:
      assert image.format == "PNG" and min(image.size) > 100
  multi = pictures.save_eval_pictures(str(tmp_path / "m_"), per_class={"0": 0.1}, labels=np.ones((2, 1)),
                                      scores=np.ones((2, 1)))
  assert sorted(multi) == ["per_class_json", "per_class_png"]  # no confusion matrix for multi-label


def test_timelines_show_truth_above_prediction(tmp_path):
  truth, prediction = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2])
  image = pictures.timeline_image(truth, prediction, 3, width=8, band=2, gap=1)
  colors = pictures.class_colors(3)
  assert image.shape == (5, 8, 3) and len({tuple(c) for c in colors}) == 3
  np.testing.assert_array_equal(image[0], colors[[0, 0, 0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(image[4], colors[[0, 0, 1, 1, 1, 1, 2, 2]])
  assert np.all(image[2] == 255)
  paths = pictures.save_segmentation(str(tmp_path), [("rec1__C10", truth, prediction)], 3)
  assert paths == [str(tmp_path / "timelines" / "rec1__C10.png")]
  np.testing.assert_array_equal(np.load(tmp_path / "predictions" / "rec1__C10.npy"), prediction)
  with pytest.raises(ValueError, match="equal non-empty"):
    pictures.timeline_image(truth, prediction[:3], 3)


def test_similarity_image_colors_cosines():
  ego = np.array([[1.0, 0.0], [0.0, 2.0]])
  exo = np.array([[3.0, 0.0], [-1.0, 0.0]])
  image = pictures.similarity_image(ego, exo, cell=2)
  assert image.shape == (4, 4, 3)
  np.testing.assert_array_equal(image[0, 0], [200, 30, 30])  # cosine +1: red
  np.testing.assert_array_equal(image[0, 2], [30, 60, 200])  # cosine -1: blue
  np.testing.assert_array_equal(image[2, 0], [255, 255, 255])  # orthogonal: white


def test_pair_examples_png(tmp_path):
  pairs = narration_pairs.PairFile(
      ego_ids=np.array(["e0", "e1"]), exo_ids=np.array(["x0", "x1"]),
      ego_narrations=np.array(["cut the melon", "ride a bike"]), exo_narrations=np.array(["slice lemon", "cycle"]),
      ego_embeddings=np.eye(2, 4, dtype=np.float32), exo_embeddings=np.eye(2, 4, dtype=np.float32),
      pair_indices=np.array([[0, 1], [1, 0]]), pair_similarities=np.array([[1.0, 0.0], [1.0, 0.0]], np.float32),
      model="test", k=2)
  path = pictures.save_pair_examples(str(tmp_path / "pairs.examples.png"), pairs)
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size[0] > 300


def test_eval_figures_per_head(tmp_path):
  """Single-label heads: per-class top-1 accuracy by hand and a confusion matrix per head."""
  scores = {"verb": np.array([[.9, .1], [.2, .8], [.6, .4]]), "noun": np.array([[.1, .9], [.3, .7], [.2, .8]])}
  labels = np.array([[0, 1], [0, 1], [1, 0]])  # (N, heads): verb, noun
  written = pictures.save_eval_figures(str(tmp_path / "r_"), scores, labels, (("verb", 2), ("noun", 2)), False)
  assert json.loads((tmp_path / "r_verb_per_class.json").read_text()) == {"0": 0.5, "1": 0.0}
  assert json.loads((tmp_path / "r_noun_per_class.json").read_text()) == {"0": 0.0, "1": 1.0}
  assert json.loads((tmp_path / "r_noun_confusion.json").read_text())["counts"] == [[0, 1], [0, 2]]
  assert {"verb_confusion_png", "noun_per_class_png"} <= set(written)
