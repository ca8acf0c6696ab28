"""Evaluation: mAP against sklearn, top-k and EPIC action accuracy against hand-worked and brute-force
references, view aggregation and batching against the formula, and the CLI end to end on the shipped clips."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from egoexo_jax import checkpointing, cli, evaluate, objectives, run_config, sharding, train
from egoexo_jax.input import convert
from testlib import TINY_FLAGS, tiny_finetune_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(3))
def test_mean_average_precision_equals_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = (rng.uniform(size=(60, 12)) < 0.2).astype(np.int64)
  labels[:, 3] = 0  # classes without a positive are left out, as PySlowFast's get_map does
  labels[:, 7] = 0
  scores = np.round(rng.uniform(size=(60, 12)), 1)  # rounded: many ties, which AP must treat as sklearn does
  keep = labels.any(axis=0)
  expected_per_class = average_precision_score(labels[:, keep], scores[:, keep], average=None)
  mean_ap, per_class = evaluate.mean_average_precision(labels, scores)
  np.testing.assert_allclose(per_class[keep], expected_per_class, rtol=1e-12)
  assert np.isnan(per_class[~keep]).all()
  assert mean_ap == pytest.approx(np.mean(expected_per_class), rel=1e-12)
  for k in np.flatnonzero(keep)[:3]:  # one class at a time, too
    assert evaluate.average_precision(labels[:, k], scores[:, k]) == pytest.approx(
        average_precision_score(labels[:, k], scores[:, k]), rel=1e-12)


def test_average_precision_by_hand():
  # Ranked: 0.9 (+), 0.8 (-), 0.7 (+), 0.7 (-): the tie forms one threshold -> P = 1, then 2/4 at R = 1.
  assert evaluate.average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.7])) == pytest.approx(
      0.5 * 1 + 0.5 * 0.5)
  with pytest.raises(ValueError, match="no class has a positive"):
    evaluate.mean_average_precision(np.zeros((3, 2)), np.ones((3, 2)))


def test_top_k_accuracy_by_hand():
  scores = np.array([[0.1, 0.5, 0.2, 0.15, 0.05, 0.0], [0.3, 0.1, 0.2, 0.25, 0.05, 0.01]])
  # Row 0 ranks 1, 2, 3, 0, 4, 5; row 1 ranks 0, 3, 2, 1, 4, 5.
  assert evaluate.top_k_accuracy(scores, np.array([1, 5]), ks=(1, 5)) == {1: 0.5, 5: 0.5}
  assert evaluate.top_k_accuracy(scores, np.array([3, 3]), ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_action_accuracy_by_hand():
  verbs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
  nouns = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
  # Segment 0: pairs by p(v) p(n): (0,0) .30, (1,0) .18, (0,1) .15, (2,0) .12, (1,1) .09, (2,1) .06, (0,2) .05:
  # its label (1, 0) is 2nd. Segment 1: (2, 1) is first. Segment 2: (1, 2) = .03 is 8th.
  accuracy = evaluate.action_top_k_accuracy(verbs, nouns, np.array([1, 2, 1]), np.array([0, 1, 2]), ks=(1, 5))
  assert accuracy == {1: pytest.approx(1 / 3), 5: pytest.approx(2 / 3)}


def test_action_accuracy_equals_ranking_the_whole_verb_noun_grid():
  rng = np.random.default_rng(1)
  verbs, nouns = rng.dirichlet(np.ones(9), size=40), rng.dirichlet(np.ones(11), size=40)
  verb_labels, noun_labels = rng.integers(0, 9, 40), rng.integers(0, 11, 40)
  joint = (verbs[:, :, None] * nouns[:, None, :]).reshape(40, -1)  # the EPIC evaluation's action scores
  expected = evaluate.top_k_accuracy(joint, verb_labels * 11 + noun_labels, ks=(1, 5))
  assert evaluate.action_top_k_accuracy(verbs, nouns, verb_labels, noun_labels, ks=(1, 5)) == expected
  # top-1: right exactly when both the verb and the noun are.
  both = (verbs.argmax(1) == verb_labels) & (nouns.argmax(1) == noun_labels)
  assert expected[1] == pytest.approx(both.mean())


def test_views_combine_by_the_formula_and_batching_keeps_the_order():
  rng = np.random.default_rng(2)
  view_scores = rng.uniform(size=(4, 6, 5))
  np.testing.assert_array_equal(evaluate.aggregate_views(view_scores, "max"), view_scores.max(axis=1))
  np.testing.assert_allclose(evaluate.aggregate_views(view_scores, "mean"), view_scores.sum(axis=1) / 6)
  with pytest.raises(ValueError, match="use 'max' or 'mean'"):
    evaluate.aggregate_views(view_scores, "sum")

  # predict(): 3 records x 6 views in batches of 4 straddle records; the last batch is padded.
  elements = [{"video_id": f"r{i}", "views": rng.integers(0, 255, (6, 2, 4, 4, 3)).astype(np.uint8),
               "labels": np.array([i, 2 * i])} for i in range(3)]
  calls = []

  def forward(views):
    calls.append(len(views))
    return {"action": views.reshape(len(views), -1)[:, :5].astype(np.float32)}

  ids, labels, scores = evaluate.predict(iter(elements), forward, batch_size=4)
  assert calls == [4] * 5 and ids == ["r0", "r1", "r2"]
  np.testing.assert_array_equal(labels, [[0, 0], [1, 2], [2, 4]])
  for i, element in enumerate(elements):
    np.testing.assert_array_equal(scores["action"][i], element["views"].reshape(6, -1)[:, :5])


def test_an_interrupted_prediction_resumes_from_its_partial_file(tmp_path):
  """predict() saves every 2 finished records; a run killed after the first save, resumed from the file,
  ends with the scores of an uninterrupted run and sends only the remaining records through the model."""
  rng = np.random.default_rng(3)
  elements = [{"video_id": f"r{i}", "views": rng.integers(0, 255, (3, 2, 4, 4, 3)).astype(np.uint8),
               "labels": np.array([i % 2, i % 3])} for i in range(5)]

  def forward(views):
    return {"verb": views.reshape(len(views), -1)[:, :4].astype(np.float32)}

  full_ids, full_labels, full_scores = evaluate.predict(iter(elements), forward, batch_size=4)
  partial, key = str(tmp_path / "results.partial.npz"), {"step": 7}

  class Killed(Exception):
    pass

  def save_then_die(scored):
    evaluate.save_partial(partial, key, scored)
    raise Killed

  with pytest.raises(Killed):
    evaluate.predict(iter(elements), forward, batch_size=4, save=save_then_die, save_every=2)
  done = evaluate.load_partial(partial, key)
  assert done["ids"] == ["r0", "r1"] and evaluate.load_partial(partial, {"step": 8}) is None  # another checkpoint
  seen = []
  rest = [e for e in elements if e["video_id"] not in done["ids"]]
  ids, labels, scores = evaluate.predict(iter(rest), lambda v: seen.append(len(v)) or forward(v), batch_size=4,
                                         done=done)
  assert ids == full_ids and sum(seen) == 3 * 4  # 3 records x 3 views, padded to whole batches of 4
  np.testing.assert_array_equal(labels, full_labels)
  np.testing.assert_array_equal(scores["verb"], full_scores["verb"])


def test_per_class_numbers_equal_sklearn_and_counting_by_hand():
  rng = np.random.default_rng(4)
  labels = np.stack([rng.integers(0, 4, 40), rng.integers(0, 6, 40)], axis=1)
  labels[:, 0][labels[:, 0] == 3] = 2  # class 3 of 'verb' has no example: AP and recall are null
  scores = {"verb": rng.uniform(size=(40, 4)), "noun": rng.uniform(size=(40, 6))}
  per_class = evaluate.per_class_metrics(scores, labels, (("verb", 4), ("noun", 6)), multi_label=False)
  for i, (name, size) in enumerate((("verb", 4), ("noun", 6))):
    entry = per_class[name]
    assert entry["count"] == [int(np.sum(labels[:, i] == k)) for k in range(size)]
    for k in range(size):
      positives = labels[:, i] == k
      if not positives.any():
        assert entry["ap"][k] is None and entry["top1"][k] is None
        continue
      assert entry["ap"][k] == pytest.approx(average_precision_score(positives, scores[name][:, k]), rel=1e-12)
      assert entry["top1"][k] == pytest.approx(np.mean(scores[name][positives].argmax(axis=1) == k))
      rank = np.array([np.sum(row > row[k]) for row in scores[name][positives]])
      assert entry["top5"][k] == pytest.approx(np.mean(rank < 5))
  hot = (rng.uniform(size=(30, 5)) < 0.3).astype(np.int64)
  multi = evaluate.per_class_metrics({"action": rng.uniform(size=(30, 5))}, hot, (("action", 5),), multi_label=True)
  assert multi["action"]["count"] == hot.sum(axis=0).tolist() and "top1" not in multi["action"]


# --------------------------------------------------------------------------- end to end


def run_cli(args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "egoexo_jax.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_cli_evaluates_the_newest_checkpoint_on_the_shipped_clips(tmp_path):
  """A Charades-Ego-format model (random weights, saved as a run's checkpoint) on the shipped clips:
  evaluate.manifest is converted, 3 videos x 30 views run through a 4-device forward, and the files agree."""
  config = tiny_finetune_config("finetune_charades_ego")
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")  # compiles the initialisation faster on CPU
  try:
    objective = objectives.resolve(config)
    optimizer, _ = train.make_optimizer(config)
    state, _ = train.create_sharded_state(objective, optimizer, config, sharding.make_mesh(1))
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=1, async_save=False)
  checkpointing.save(manager, 7, state)
  manager.close()
  before = sorted(os.listdir(tmp_path / "checkpoints"))

  run_config.save(config, str(tmp_path), argv=["main.py"], process_index=0)  # what the trainer writes at start

  # --workdir alone: the saved config; --step names the checkpoint.
  result = run_cli([f"--workdir={tmp_path}", "--step=7", f"--output_dir={tmp_path / 'out'}", "--save_every=1",
                    "--log_every=1"])
  assert '"checkpoint_step": 7' in result.stdout
  assert "Evaluated 3/3 records" in result.stderr  # progress lines
  output = tmp_path / "out" / "results_step7.json"
  results = json.loads(output.read_text())
  assert not (tmp_path / "out" / "results_step7.partial.npz").exists()  # partial results gone once complete
  assert results["checkpoint"] == "step" and results["per_class"]["action"]["count"][19] == 1
  assert results["num_records"] == 3 and results["views"]["views_per_record"] == 30 and results["ensemble"] == "max"
  assert results["metrics"]["num_classes_with_positives"] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before  # read-only
  assert list((tmp_path / "eval").glob("events.out.tfevents.*"))  # CLU scalars

  predictions = np.load(results["predictions"])
  assert predictions["action_views"].shape == (3, 30, 157) and predictions["action_views"].dtype == np.float16
  np.testing.assert_allclose(predictions["action"], predictions["action_views"].astype(np.float32).max(axis=1),
                             rtol=1e-3)
  labels = predictions["labels"]
  assert sorted(predictions["ids"]) == ["box", "carphone_pristine", "cup"]
  assert {int(k) for k in np.flatnonzero(labels.any(axis=0))} == {19, 40, 107}
  keep = labels.any(axis=0)
  assert results["metrics"]["mAP"] == pytest.approx(
      average_precision_score(labels[:, keep], predictions["action"][:, keep], average=None).mean(), rel=1e-6)
  per_class = json.loads((tmp_path / "out" / "results_step7_per_class.json").read_text())  # and as a bar chart beside it
  assert len(per_class) == 157 and [k for k, v in per_class.items() if v is not None] == ["19", "40", "107"]
  np.testing.assert_allclose([per_class[k] for k in ("19", "40", "107")], average_precision_score(
      labels[:, keep], predictions["action"][:, keep], average=None), rtol=1e-6)
  assert results["figures"]["action_per_class_png"] == str(tmp_path / "out" / "results_step7_per_class.png")
  # The records came from the shipped test manifest, converted once into the workdir.
  assert (tmp_path / "records" / "eval.json").exists()
  assert convert.read_manifest(str(ROOT / "data/finetune/charades_ego_test_manifest.csv"))[0].video_id == "box"

  # A config that does not fit the run: one line naming the field, exit status 2, nothing evaluated.
  mismatch = subprocess.run([sys.executable, "-m", "egoexo_jax.evaluate", f"--workdir={tmp_path}",
                             "--config=configs/finetune_charades_ego.py:small", *TINY_FLAGS,
                             "--config.model.backbone_args.width=16", "--step=99"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
  assert mismatch.returncode == cli.EXIT_USER_ERROR
  last = mismatch.stderr.strip().splitlines()[-1]
  assert last.startswith("evaluate.py: error: the given config differs from") and \
      "model.backbone_args.width: saved 8, given 16" in last
  missing = subprocess.run([sys.executable, "-m", "egoexo_jax.evaluate", f"--workdir={tmp_path}", "--step=99"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert missing.returncode == cli.EXIT_USER_ERROR and "no checkpoint of step 99" in missing.stderr


def test_a_checkpoint_of_another_num_classes_is_a_one_line_error_naming_the_parameter(tmp_path):
  config = tiny_finetune_config("finetune_charades_ego")
  objective = objectives.resolve(config)
  optimizer, _ = train.make_optimizer(config)
  mesh = sharding.make_mesh(1)
  abstract, _ = train.abstract_state(objective, optimizer, config, mesh)
  state = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), abstract)  # the values do not matter here
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=1, async_save=False)
  checkpointing.save(manager, 3, state)
  manager.close()
  config.model.num_classes.action = 10  # the checkpoint's head has 157 classes
  with pytest.raises(checkpointing.ShapeMismatchError) as error:
    evaluate.restore_variables(config, str(tmp_path), mesh)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{tmp_path / 'checkpoints'}/3: 'params/")
  assert "3: 'params/action_head/linear/bias' has shape (157,) in the checkpoint but (10,) in this config" in message
