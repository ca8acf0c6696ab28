"""Precise BatchNorm statistics against NumPy averages of each batch's statistics of every BatchNorm input,
and periodic evaluation in a fine-tuning run: the schedule, the best checkpoint, the final precise statistics."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import assert_trees_close
from egoexo_jax import checkpointing, evaluate, objectives, precise_bn, sharding, train, train_eval
from egoexo_jax.input import convert
from testlib import tiny_finetune_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def rbg_keys():
  """The faster-compiling 'rbg' PRNG, as finetune_test; restored afterwards."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


def bn_inputs_by_numpy(model, variables, clips):
  """{path of a BatchNorm: (mean, biased variance) over (B, t, h, w) of its input}, from the train-mode
  outputs of the convolution before each BatchNorm ('bn' <- 'conv', 'bn_a' <- 'conv_a', ...)."""
  _, state = model.apply(variables, clips, train=True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=lambda module, _: "conv" in (module.name or ""),
                         rngs={"dropout": jax.random.key(0)})
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
    names = tuple(k.key for k in path[:-1])
    if names in out:
      continue
    node = state["intermediates"]
    for name in names[:-1] + (names[-1].replace("bn", "conv"),):
      node = node[name]
    x = np.asarray(node["__call__"][0], np.float64)
    out[names] = (x.mean(axis=(0, 1, 2, 3)), x.var(axis=(0, 1, 2, 3)))
  return out


def test_precise_statistics_are_the_average_of_each_batch_statistics():
  config = tiny_finetune_config("finetune_epic100", **{"mesh.num_devices": 2})
  objective = objectives.resolve(config)
  model = objective.model
  mesh = sharding.mesh_from_config(config.mesh)
  optimizer, _ = train.make_optimizer(config)
  state, shardings = train.create_sharded_state(objective, optimizer, config, mesh)
  # Running statistics far from any batch's: the result must not depend on them.
  state = state.replace(batch_stats=jax.tree.map(lambda x: x + 5.0, state.batch_stats))
  rng = np.random.default_rng(0)
  batches = [{"clips": rng.integers(0, 256, (4, 4, 64, 64, 3), dtype=np.uint8) // (k + 1),
              "labels": rng.integers(0, 5, (4, 2)).astype(np.int32)} for k in range(3)]
  statistics_fn = precise_bn.make_batch_statistics_fn(objective, config, mesh, shardings)
  got, count = precise_bn.average_statistics(statistics_fn, state.params, state.batch_stats,
                                             (sharding.host_batch_to_global(b, mesh) for b in batches))
  assert count == 3

  from egoexo_jax.input import transforms  # pylint: disable=g-import-not-at-top
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  per_batch = [bn_inputs_by_numpy(model, variables, transforms.normalize_clips(b["clips"], jnp.float32))
               for b in batches]
  assert len(per_batch[0]) == len(jax.tree.leaves(state.batch_stats)) // 2 > 5
  got = jax.device_get(got)
  for names, _ in per_batch[0].items():
    node = got
    for name in names:
      node = node[name]
    want_mean = np.mean([p[names][0] for p in per_batch], axis=0)
    want_var = np.mean([p[names][1] for p in per_batch], axis=0)
    np.testing.assert_allclose(node["mean"], want_mean, rtol=2e-4, atol=2e-5, err_msg=str(names))
    np.testing.assert_allclose(node["var"], want_var, rtol=2e-4, atol=2e-5, err_msg=str(names))


def test_num_batches_and_schedule_follow_the_config():
  config = tiny_finetune_config("finetune_epic100", **{"precise_bn.num_batches": 200, "data.num_train_examples": 20})
  assert precise_bn.num_batches(config) == 3  # one epoch of 20 records at batch 8, as min(200, len(loader))
  config.data.num_train_examples = 0
  assert precise_bn.num_batches(config) == 200
  config.train_eval.every_epochs = 2.0
  with pytest.raises(ValueError, match="every_epochs is 2.0 but data.num_train_examples is not set"):
    train_eval.eval_every_steps(config)
  config.data.num_train_examples = 100
  assert train_eval.eval_every_steps(config) == 25  # ceil(2 x 100 / 8)
  config.train_eval.every_steps = 7
  assert train_eval.eval_every_steps(config) == 7
  assert train_eval.best_metric_name(config) == "action_top1"
  assert train_eval.best_metric_name(tiny_finetune_config("finetune_charades_ego")) == "mAP"
  released = {name: __import__(f"configs.{name}", fromlist=["get_config"]).get_config("")
              for name in ("finetune_epic100", "finetune_epic55", "finetune_charades_ego")}
  assert released["finetune_epic100"].precise_bn.num_batches == 200  # released EPIC yamls: NUM_BATCHES_PRECISE 200
  assert released["finetune_epic55"].precise_bn.num_batches == 200
  assert released["finetune_charades_ego"].precise_bn.num_batches == 0  # USE_PRECISE_STATS False
  assert all(c.train_eval.every_epochs == 2.0 for c in released.values())  # TRAIN.EVAL_PERIOD 2
  assert all(c.eval.fully_convolutional for c in released.values())


@pytest.fixture(scope="module")
def epic_record_sets(tmp_path_factory):
  """The shipped EPIC-100-format training and validation segments."""
  out = {}
  for split in ("train", "validation"):
    prefix = tmp_path_factory.mktemp("epic") / split
    convert.convert_manifest(str(ROOT / f"data/finetune/epic100_{split}_manifest.csv"), str(prefix), short_side=72)
    out[split] = f"{prefix}.tfrecord-*"
  return out


def test_an_epoch_based_eval_period_counts_the_training_records_at_start(epic_record_sets, tmp_path):
  config = tiny_finetune_config("finetune_epic100", **{
      "data.train_records": epic_record_sets["train"], "data.eval_records": epic_record_sets["validation"],
      "data.num_train_examples": 0, "train_eval.every_epochs": 3.0, "train_eval.every_steps": 0,
      "global_batch_size": 4})
  with pytest.raises(ValueError, match="every_epochs is 3.0 but data.num_train_examples is not set"):
    train_eval.eval_every_steps(config)
  resolved = train.resolve_run_length(config, str(tmp_path))
  rows = len((ROOT / "data/finetune/epic100_train_manifest.csv").read_text().strip().splitlines()) - 1
  assert rows == 8 and resolved.data.num_train_examples == rows  # one record per manifest row
  assert train_eval.eval_every_steps(resolved) == 6  # ceil(3 x 8 / 4)
  assert config.data.num_train_examples == 0  # the caller's config is left as it was
  # Counted in steps, or without evaluation records: nothing to count.
  for overrides in ({"train_eval.every_steps": 2}, {"data.eval_records": ""}):
    other = config.copy_and_resolve_references()
    for key, value in overrides.items():
      node, leaf = other, key.split(".")
      node[leaf[0]][leaf[1]] = value
    assert train.resolve_run_length(other, str(tmp_path)).data.num_train_examples == 0


def test_training_evaluates_periodically_keeps_the_best_and_saves_precise_statistics(epic_record_sets, tmp_path,
                                                                                     monkeypatch):
  config = tiny_finetune_config("finetune_epic100", **{
      "data.train_records": epic_record_sets["train"], "data.eval_records": epic_record_sets["validation"],
      "train_eval.every_steps": 2, "precise_bn.num_batches": 2, "num_train_steps": 5, "checkpoint_every_steps": 5,
      "optimizer.decay_steps": (3, 4), "mesh.num_devices": 2})
  seen = {"precise": [], "metrics": []}
  real_precise, real_evaluate = precise_bn.PreciseBatchNorm.__call__, train_eval.TrainingEvaluation.evaluate

  def record_precise(self, state, step):
    out = real_precise(self, state, step)
    seen["precise"].append((step, jax.device_get(state.batch_stats), jax.device_get(out.batch_stats)))
    return out

  def record_evaluate(self, step, state):
    metrics = real_evaluate(self, step, state)
    seen["metrics"].append((step, metrics))
    return metrics

  monkeypatch.setattr(precise_bn.PreciseBatchNorm, "__call__", record_precise)
  monkeypatch.setattr(train_eval.TrainingEvaluation, "evaluate", record_evaluate)
  final = train.train_and_evaluate(config, str(tmp_path))

  assert [s for s, _, _ in seen["precise"]] == [2, 4, 5] and [s for s, _ in seen["metrics"]] == [2, 4, 5]
  step, before, after = seen["precise"][-1]
  assert not np.allclose(jax.tree.leaves(before)[0], jax.tree.leaves(after)[0])  # EMA replaced
  assert_trees_close(jax.device_get(final.batch_stats), after, rtol=0, atol=0)
  saved = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "5" / "state"))
  assert_trees_close(saved["batch_stats"], after, rtol=0, atol=0)  # the final checkpoint holds them

  best = json.loads((tmp_path / "best" / "best.json").read_text())
  values = [m["action_top1"] for _, m in seen["metrics"]]
  assert best["metric"] == "action_top1" and best["value"] == max(values)
  assert best["step"] == [s for s, m in seen["metrics"] if m["action_top1"] == max(values)][0]
  assert sorted(p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()) == [str(best["step"])]
  assert list((tmp_path / "eval").glob("events.out.tfevents.*"))

  # evaluate --checkpoint=best restores that state.
  mesh = sharding.make_mesh(1)
  _, variables, restored_step = evaluate.restore_variables(config, str(tmp_path), mesh, checkpoint="best")
  assert restored_step == best["step"]
  settings = evaluate.eval_settings(config)
  settings.num_clips, settings.num_crops = 1, 1
  objective = objectives.resolve(config)
  model = objective.model
  again = evaluate.score_records(config, model, variables, mesh, epic_record_sets["validation"], settings)["metrics"]
  assert again["action_top1"] == pytest.approx(best["value"])
