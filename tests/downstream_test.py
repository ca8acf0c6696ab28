"""Downstream tasks: metrics against hand-worked examples, MS-TCN loss against NumPy, anticipation
samples, the segmentation / anticipation loops on the shipped stand-in features, feature extraction."""

import importlib.util
import json
import pathlib

import flax
import jax
import numpy as np
import pytest

from egoexo_jax import checkpointing, objectives, train
from egoexo_jax.downstream import anticipation, annotations, extract, loop, metrics, mstcn, segmentation

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "evgap"

# --------------------------------------------------------------------------- metrics

TRUTH = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
PREDICTED = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1])
# Predicted segments, in order, against truth 0:[0,4) and 1:[4,10):
#   0:[0,3) IoU 3/4 -> TP at every threshold;  1:[3,6) IoU 2/7 = .29 -> TP at .10 and .25, FP at .50;
#   0:[6,8) IoU 0 -> FP;  1:[8,10) IoU 2/6 = .33 but truth 1 is taken (or IoU < .5) -> FP.
# @10, @25: TP 2, FP 2, FN 0 -> P 1/2, R 1 -> F1 2/3.  @50: TP 1, FP 3, FN 1 -> P 1/4, R 1/2 -> F1 1/3.
# Edit: [0, 1, 0, 1] vs [0, 1]: 2 deletions -> 1 - 2/4.  Accuracy: frames 3, 6, 7 wrong -> 7/10.


def test_segmentation_scores_hand_worked():
  scores = metrics.segmentation_scores([PREDICTED], [TRUTH])
  assert scores == pytest.approx({"f1@10": 200 / 3, "f1@25": 200 / 3, "f1@50": 100 / 3, "edit": 50.0,
                                  "accuracy": 70.0})


def test_segmentation_counts_are_summed_over_sequences_and_unlabelled_frames_ignored():
  # Second sequence: perfect, with two unlabelled frames (-1) that form no segment and no accuracy frame.
  truth_b = np.array([2, 2, -1, -1, 3, 3])
  predicted_b = np.array([2, 2, 0, 0, 3, 3])
  assert metrics.segments(truth_b) == [(2, 0, 2), (3, 4, 6)]
  scores = metrics.segmentation_scores([PREDICTED, predicted_b], [TRUTH, truth_b])
  # @50: TP 1 + 2, FP 3 + 1 (the predicted 0:[2,4) has no truth of label 0), FN 1 + 0.
  precision, recall = 3 / 7, 3 / 4
  assert scores["f1@50"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
  # Edit: sequence b's [2, 0, 3] vs [2, 3] = 1 - 1/3; mean with 50.
  assert scores["edit"] == pytest.approx((50 + 100 * 2 / 3) / 2)
  assert scores["accuracy"] == pytest.approx(100 * (7 + 4) / (10 + 4))


def test_levenshtein():
  word = lambda s: [ord(c) for c in s]
  assert metrics.levenshtein(word("kitten"), word("sitting")) == 3
  assert metrics.levenshtein([], [1, 2]) == 2 and metrics.levenshtein([1, 2, 3], [1, 2, 3]) == 0


def test_class_mean_top_k_recall_hand_worked():
  scores = np.array([[.9, .05, .05], [.1, .8, .1], [.2, .7, .1], [.5, .1, .4]])
  labels = np.array([0, 0, 1, 2])
  # top-1: [0, 1, 1, 0] -> class 0: 1/2, class 1: 1/1, class 2: 0/1 -> mean 1/2.
  assert metrics.class_mean_top_k_recall(scores, labels, 1) == pytest.approx(50.0)
  # top-2 adds: sample 1 -> {1, 0} (hit), sample 3 -> {0, 2} (hit) -> every class 1.
  assert metrics.class_mean_top_k_recall(scores, labels, 2) == pytest.approx(100.0)
  # A frequent class does not outweigh a rare one: 9 right of class 0, the only class-1 example wrong.
  many = np.array([[1.0, 0.0]] * 10)
  assert metrics.class_mean_top_k_recall(many, np.array([0] * 9 + [1]), 1) == pytest.approx(50.0)


# --------------------------------------------------------------------------- MS-TCN


def np_mstcn_loss(logits, labels, mask, weight=0.15, clip=4.0):
  logits = logits.astype(np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  total = 0.0
  for stage in log_p:
    picked = [-stage[b, t, labels[b, t]] for b in range(labels.shape[0]) for t in range(labels.shape[1])
              if mask[b, t] and labels[b, t] >= 0]
    squared = [np.minimum((stage[b, t] - stage[b, t - 1]) ** 2, clip**2).mean()
               for b in range(labels.shape[0]) for t in range(1, labels.shape[1]) if mask[b, t] and mask[b, t - 1]]
    total += np.mean(picked) + weight * np.mean(squared)
  return total


def test_mstcn_loss_matches_numpy_and_model_respects_the_mask():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (3, 2, 7, 4)).astype(np.float32)
  labels = rng.integers(-1, 4, (2, 7)).astype(np.int32)
  mask = np.array([[1] * 7, [1] * 5 + [0] * 2], np.float32)
  np.testing.assert_allclose(jax.jit(mstcn.mstcn_loss)(logits, labels, mask), np_mstcn_loss(logits, labels, mask),
                             rtol=1e-5)
  model = mstcn.MultiStageTCN(num_classes=4, num_stages=2, num_layers=3, features=8)
  features = rng.normal(size=(1, 12, 5)).astype(np.float32)
  params = jax.jit(lambda r: model.init(r, features, np.ones((1, 12)), train=False))(jax.random.key(0))
  apply = jax.jit(lambda x, m: model.apply(params, x, m, train=False))
  short = apply(features[:, :9], np.ones((1, 9)))
  padded = np.concatenate([features[:, :9], rng.normal(size=(1, 3, 5)).astype(np.float32)], axis=1)
  masked = apply(padded, np.array([[1] * 9 + [0] * 3], np.float32))
  assert short.shape == (2, 1, 9, 4)
  np.testing.assert_allclose(masked[:, :, :9], short, rtol=1e-5, atol=1e-5)  # padding never leaks in


def test_segmentation_trains_keeps_the_best_and_tests_a_held_out_view(tmp_path):
  results = segmentation.run(
      str(DEMO / "features"), str(DEMO / "segments.csv"), str(DEMO / "split.csv"), str(tmp_path),
      train_views=["ego_0", "ego_1", "exo_0", "exo_1"], test_views=["exo_2"],
      settings=segmentation.SegmentationSettings(num_stages=2, num_layers=4, features=16, batch_size=4),
      loop_settings=loop.LoopSettings(epochs=4, learning_rate=5e-3))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test"] == pytest.approx(results["test"])
  assert saved["train_views"] == ["ego_0", "ego_1", "exo_0", "exo_1"] and saved["test_views"] == ["exo_2"]
  assert saved["sequences"] == {"train": 6 * 4, "val": 2 * 4, "test": 2 * 1}
  assert saved["num_classes"] == 15 and len(saved["history"]) == 4
  losses = [h["train_loss"] for h in saved["history"]]
  assert losses[-1] < losses[0]
  assert set(saved["test"]) == {"f1@10", "f1@25", "f1@50", "edit", "accuracy", "mean"}
  assert all(0 <= v <= 100 for v in saved["test"].values())
  best = max(saved["history"], key=lambda h: h["mean"])
  assert saved["best_epoch"] == best["epoch"]
  state = flax.serialization.msgpack_restore((tmp_path / loop.BEST_CHECKPOINT).read_bytes())
  assert "stage_0" in state and "stage_1" in state
  # Test predictions saved per sequence, one class per feature frame, and a timeline picture of each.
  saved_predictions = sorted((tmp_path / "predictions").glob("*.npy"))
  assert len(saved_predictions) == 2 and sorted((tmp_path / "timelines").glob("*.png"))
  for path in saved_predictions:
    recording, view = path.stem.split("__")
    frames = len(np.load(DEMO / "features" / recording / f"{view}.npy"))
    prediction = np.load(path)
    assert prediction.shape == (frames,) and 0 <= prediction.min() and prediction.max() < 15


# --------------------------------------------------------------------------- anticipation


def test_anticipation_samples_stop_tau_a_before_each_segment():
  features = np.arange(20, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
  segments = [annotations.Segment(0, 1, 0, 0, 0), annotations.Segment(1, 3, 1, 1, 0),
              annotations.Segment(3, 10, 2, 2, 1), annotations.Segment(10, 20, 3, 0, 1)]
  sequence = annotations.ViewSequence("r", "v", features, segments)
  observed, mask, labels = annotations.anticipation_samples(sequence, fps=2.0, anticipation_seconds=1.0,
                                                            observed_frames=4)
  # tau_a = 2 frames: segments at 0 and 1 have nothing before them; the one at 3 sees frame 0 only,
  # the one at 10 sees frames 4..7.
  np.testing.assert_array_equal(labels, [[2, 1, 2], [0, 1, 3]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(observed[:, :, 0], [[0, 0, 0, 0], [4, 5, 6, 7]])


def test_anticipation_trains_and_reports_class_mean_recall(tmp_path):
  results = anticipation.run(
      str(DEMO / "features"), str(DEMO / "segments.csv"), str(DEMO / "split.csv"), str(tmp_path),
      settings=anticipation.AnticipationSettings(fps=30.0, anticipation_seconds=0.3, observed_frames=16, hidden=16,
                                                 batch_size=32),
      loop_settings=loop.LoopSettings(epochs=3, learning_rate=1e-3))
  assert set(results["test"]) == {"verb_recall@5", "object_recall@5", "action_recall@5"}
  assert results["num_classes"] == {"verb": 3, "object": 5, "action": 15}
  assert results["examples"]["train"] > 0 and (tmp_path / loop.BEST_CHECKPOINT).exists()
  # 3 verbs and 5 objects: every class is in every top 5, so those recalls are 100 by construction.
  assert results["test"]["verb_recall@5"] == results["test"]["object_recall@5"] == 100.0
  assert 0 <= results["test"]["action_recall@5"] <= 100


# --------------------------------------------------------------------------- extraction


def tiny_evgap_config():
  spec = importlib.util.spec_from_file_location("evgap_pair", ROOT / "configs" / "evgap_pair.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("small")
  config.model.update(width=8, num_layers=2, num_heads=2, mlp_dim=16, embed_dim=8, max_length=16)
  return config


def test_window_plan():
  indices, mask = extract.window_plan(5, 2, "tokens")
  np.testing.assert_array_equal(indices, [[0, 1], [2, 3], [4, 0]])
  np.testing.assert_array_equal(mask, [[1, 1], [1, 1], [1, 0]])
  indices, mask = extract.window_plan(3, 4, "class")  # frame t: t-2 .. t+1
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(np.where(mask, indices, -1), [[-1, -1, 0, 1], [-1, 0, 1, 2], [0, 1, 2, -1]])


def test_extraction_writes_the_encoder_features_of_every_view(tmp_path):
  config = tiny_evgap_config()
  objective = objectives.resolve(config)
  model = objective.model
  params = jax.jit(lambda r: train.init_variables(objective, config, r))(jax.random.key(3))["params"]
  manager = checkpointing.make_manager(str(tmp_path / "run"), max_to_keep=1, async_save=False)
  checkpointing.save(manager, 1, {"params": params, "batch_stats": {}})
  manager.close()
  manifest = tmp_path / "views.csv"
  rows = (DEMO / "views.csv").read_text().splitlines()
  manifest.write_text("\n".join(rows[:1] + [r.replace("features/", f"{DEMO}/features/") for r in rows[1:]
                                            if r.startswith(("tree_r0,ego_0", "tree_r0,exo_1"))]) + "\n")
  written = extract.extract_manifest(config, str(tmp_path / "run"), str(manifest), str(tmp_path / "tokens"))
  assert sorted(pathlib.Path(p).name for p in written) == ["ego_0.npy", "exo_1.npy"]
  raw = np.load(DEMO / "features" / "tree_r0" / "exo_1.npy").astype(np.float32)  # 68 frames
  tokens = np.load(tmp_path / "tokens" / "tree_r0" / "exo_1.npy")
  assert tokens.shape == (68, 8)
  encode = jax.jit(lambda x, m: model.apply({"params": params}, x, m, train=False, method=model.encode))
  # Frames 8..15 are the second window of 8; frames 64..67 the last, padded one.
  second = encode(raw[None, 8:16], np.ones((1, 8), bool))["tokens"][0]
  np.testing.assert_allclose(tokens[8:16], second, rtol=1e-4, atol=1e-5)
  last = encode(np.pad(raw[64:], ((0, 4), (0, 0)))[None], np.array([[1] * 4 + [0] * 4], bool))["tokens"][0, :4]
  np.testing.assert_allclose(tokens[64:], last, rtol=1e-4, atol=1e-5)
  extract.extract_manifest(config, str(tmp_path / "run"), str(manifest), str(tmp_path / "class"), mode="class")
  centred = np.load(tmp_path / "class" / "tree_r0" / "exo_1.npy")
  window = encode(raw[None, 30 - 4:30 + 4], np.ones((1, 8), bool))["class_tokens"][-1, 0]
  np.testing.assert_allclose(centred[30], window, rtol=1e-4, atol=1e-5)
