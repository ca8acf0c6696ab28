"""Recipes: every config value against the recipe table (configs/recipe_egoexo.py, read as data), the
PySlowFast LR policies against their formulas re-derived here in NumPy, the released clip sampler and
SlowFast target frames against hand-worked examples, and each recipe's loss total against NumPy."""

import dataclasses
import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from configs import common_recipe, recipe_egoexo
from egoexo_jax import lr_policy, objectives, optimizer, train
from egoexo_jax.input import transforms

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_NAMES = sorted({name for row in recipe_egoexo.ROWS for name in row.configs})


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("recipe", common_recipe.RECIPES)
@pytest.mark.parametrize("small", [False, True])
def test_every_config_value_is_the_tables(name, recipe, small):
  arg = ",".join((["small"] if small else []) + [recipe])
  config = load_config(name, arg)
  rows = common_recipe.rows_for(recipe_egoexo.ROWS, name, small=small)
  assert rows and config.recipe == recipe
  for row in rows:
    assert common_recipe.get_key(config, row.key) == row.value(recipe), (name, arg, row.setting)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_the_default_recipe_is_released(name):
  assert load_config(name, "").to_dict() == load_config(name, "released").to_dict()


def test_table_rows_are_complete_and_sourced():
  for row in recipe_egoexo.ROWS:
    assert row.setting and row.key and row.configs, row
    assert row.released_source and row.paper_source, row.setting
    if row.released != row.paper:
      assert row.paper_source != recipe_egoexo.SILENT, row.setting  # a different paper value cites the text
  keys = [(name, row.key) for row in recipe_egoexo.ROWS for name in row.configs]
  assert len(keys) == len(set(keys)), "a config key is set by two rows"
  assert "| Action cross-entropy weight |" in common_recipe.markdown_table(recipe_egoexo.ROWS)


def test_readme_shows_the_table():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert common_recipe.markdown_table(recipe_egoexo.ROWS) in readme


def test_recipes_differ_where_the_issue_says():
  released, paper = load_config("egoexo", ""), load_config("egoexo", "paper")
  assert (released.loss.weight_action, paper.loss.weight_action) == (0.5, 1.0)
  assert (released.loss.interaction_reduction, paper.loss.interaction_reduction) == ("sum", "mean")
  assert released.model.dropout_rate == 0.0 and released.data.target_fps == 30.0
  assert released.optimizer.weight_decay_on == "all_but_batchnorm"
  teacher = load_config("ego_classifier", "")
  assert (teacher.optimizer.base_learning_rate, teacher.optimizer.lr_policy, teacher.epochs) == (0.01, "cosine", 100)
  epic100 = load_config("finetune_epic100", "")
  assert (epic100.optimizer.base_learning_rate, epic100.optimizer.reference_batch_size) == (0.02, 128)
  # Precise BN: 200 batches in the released EPIC yamls, off in their Ego_Exo_star ones and in Charades-Ego's.
  assert (epic100.precise_bn.num_batches, load_config("finetune_epic100", "star").precise_bn.num_batches) == (200, 0)
  assert load_config("finetune_charades_ego", "").precise_bn.num_batches == 0
  assert (epic100.eval.crop_size, epic100.eval.fully_convolutional, epic100.train_eval.every_epochs) == \
      (256, True, 2.0)
  with pytest.raises(ValueError, match="at most one recipe"):
    load_config("egoexo", "released,paper")
  with pytest.raises(ValueError, match="unknown config argument 'paper,tiny'"):
    load_config("finetune_epic100", "paper,tiny")


# --------------------------------------------------------------------------- LR policies (PySlowFast)


def pyslowfast_lr(epoch, *, policy, base_lr, max_epoch, warmup_epochs=0.0, warmup_start_lr=0.0, steps=(),
                  lrs=()):
  """slowfast/utils/lr_policy.py's get_lr_at_epoch, written out again in NumPy."""
  def curve(e):
    if policy == "cosine":
      return base_lr * (np.cos(np.pi * e / max_epoch) + 1.0) * 0.5
    bounds = list(steps) + [max_epoch]
    index = next((i for i, s in enumerate(bounds) if e < s), len(bounds)) - 1
    return lrs[index] * base_lr
  if epoch < warmup_epochs:
    return epoch * (curve(warmup_epochs) - warmup_start_lr) / warmup_epochs + warmup_start_lr
  return curve(epoch)


def test_released_pretraining_cosine_is_pyslowfasts_per_epoch():
  config = load_config("egoexo", "")
  config.global_batch_size = 512
  config.data.num_train_examples = 240_000
  config, plan = lr_policy.resolve(config)
  steps_per_epoch = 240_000 / 512
  assert config.num_train_steps == math.ceil(200 * steps_per_epoch) == 93_750
  schedule = optimizer.make_schedule(config)
  for epoch in (0.0, 1.0, 17.0, 33.9, 34.0, 50.0, 83.0, 100.0, 150.0, 199.5):
    step = int(round(epoch * steps_per_epoch))
    want = pyslowfast_lr(step / steps_per_epoch, policy="cosine", base_lr=0.8, max_epoch=200, warmup_epochs=34,
                         warmup_start_lr=0.08)
    assert float(schedule(step)) == pytest.approx(want, rel=2e-5, abs=1e-7), epoch
  # Warm-up ends on the curve, below the peak: 0.8 (1 + cos(34 pi / 200)) / 2 = 0.7448.
  assert float(schedule(int(34 * steps_per_epoch))) == pytest.approx(0.8 * (1 + np.cos(34 * np.pi / 200)) / 2,
                                                                     rel=1e-4)
  assert "200 epochs x 468.75 steps/epoch (240000 records / global batch 512) = 93750 steps" in plan.describe(config)


def test_steps_with_relative_lrs_per_epoch_and_steps_from_the_record_count():
  config = load_config("egoexo", "")
  config.optimizer.lr_policy = "steps_with_relative_lrs"
  config.optimizer.lr_steps, config.optimizer.lrs = (0, 20, 25), (1.0, 0.1, 0.01)
  config.optimizer.warmup_epochs, config.optimizer.warmup_start_fraction = 2.0, 0.1
  config.epochs, config.global_batch_size, config.optimizer.base_learning_rate = 30.0, 128, 0.02
  config.optimizer.reference_batch_size = 128
  config, plan = lr_policy.resolve(config, num_records=1000)  # counted records: 7.8125 steps per epoch
  assert config.num_train_steps == math.ceil(30 * 1000 / 128) and plan.num_records == 1000
  schedule = optimizer.make_schedule(config)
  for step in range(config.num_train_steps):
    want = pyslowfast_lr(step * 128 / 1000, policy="steps_with_relative_lrs", base_lr=0.02, max_epoch=30,
                         warmup_epochs=2.0, warmup_start_lr=0.002, steps=(0, 20, 25), lrs=(1.0, 0.1, 0.01))
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5), step


def test_epoch_based_runs_need_a_record_count():
  config = load_config("egoexo", "")
  with pytest.raises(ValueError, match="number of training records is unknown"):
    lr_policy.resolve(config, num_records=0)
  # Restoring a checkpoint needs only the optimiser's structure: it builds; asking for a rate raises.
  optimizer, schedule = train.make_optimizer(config)
  optimizer.init({"w": np.zeros(2, np.float32)})
  with pytest.raises(lr_policy.RecordCountUnknown):
    schedule(0)


def test_small_counts_the_same_policy_in_steps():
  config = load_config("egoexo", "small")  # 300 steps, 30 of warm-up, 0.05 per 64 at batch 8
  config, plan = lr_policy.resolve(config)
  schedule = optimizer.make_schedule(config)
  for step in (0, 10, 29, 30, 31, 150, 299):
    want = pyslowfast_lr(step, policy="cosine", base_lr=0.05 * 8 / 64, max_epoch=300, warmup_epochs=30,
                         warmup_start_lr=0.1 * 0.05 * 8 / 64)
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
  assert plan.describe(config).startswith("LR policy 'cosine' (PySlowFast): 300 steps")


@pytest.mark.parametrize("name,records", [("finetune_charades_ego", 3085), ("finetune_epic100", 67217)])
def test_step_based_finetuning_schedules_equal_pyslowfasts_at_every_step(name, records):
  config = load_config(name, "")
  schedule = optimizer.make_schedule(config)
  per_epoch = records / config.global_batch_size
  peak = config.optimizer.base_learning_rate * config.global_batch_size / config.optimizer.reference_batch_size
  kwargs = (dict(policy="cosine", max_epoch=60) if name == "finetune_charades_ego" else
            dict(policy="steps_with_relative_lrs", max_epoch=30, steps=(0, 20, 25), lrs=(1, 0.1, 0.01)))
  probe = sorted({0, 1, config.num_train_steps - 1, *range(0, config.num_train_steps, 97),
                  *(s + d for s in config.optimizer.decay_steps for d in (-1, 0))})
  got = np.asarray(jax.vmap(schedule)(jnp.asarray(probe)))
  want = [pyslowfast_lr(s / per_epoch, base_lr=peak, **kwargs) for s in probe]
  # The cosine runs over ceil(60 x 3085 / 64) = 2893 steps instead of 2892.2: the curve shifts by under one
  # step, at most 1.1e-4 of LR (0.05% of the 0.25 peak).
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1.5e-4)


# --------------------------------------------------------------------------- weight decay


def test_weight_decay_on_all_but_batchnorm_includes_biases_and_skips_bn():
  params = {"backbone": {"stem": {"conv": {"kernel": np.ones((1, 3, 3, 3, 4))}, "bn": {"scale": np.ones(4),
                                                                                       "bias": np.ones(4)}},
                         "block": {"shortcut_bn": {"scale": np.ones(4)}, "bn_a": {"bias": np.ones(4)}}},
            "action_head": {"linear": {"kernel": np.ones((4, 5)), "bias": np.ones(5)}},
            "encoder": {"LayerNorm_0": {"scale": np.ones(4)}, "ln_1": {"bias": np.ones(4)}}}
  mask = optimizer.weight_decay_mask("all_but_batchnorm")(params)
  assert mask["backbone"]["stem"]["conv"]["kernel"] and mask["action_head"]["linear"]["bias"]
  assert not any(jax.tree.leaves((mask["backbone"]["stem"]["bn"], mask["backbone"]["block"], mask["encoder"])))
  kernels = optimizer.weight_decay_mask("kernels")(params)
  assert kernels["backbone"]["stem"]["conv"]["kernel"] and not kernels["action_head"]["linear"]["bias"]
  with pytest.raises(ValueError, match="weight_decay_on 'biases'"):
    optimizer.weight_decay_mask("biases")


# --------------------------------------------------------------------------- clips and SlowFast targets


def test_slow_frames_of_32_fast_frames_are_the_released_ones():
  # torch.linspace(0, 31, 8).long(): 0, 4.43, 8.86, 13.29, 17.71, 22.14, 26.57, 31 -> truncated.
  pairs = transforms.interaction_time_steps(32, 8, "slow_frames")
  assert pairs == list(zip([0, 4, 8, 13, 17, 22, 26, 31], range(8)))
  assert transforms.interaction_time_steps(8, 8, "slow_frames") == transforms.interaction_time_steps(8, 8, "max")
  assert transforms.interaction_time_steps(32, 8, "max")[:5] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1)]


def test_slow_frame_targets_keep_only_those_frames_boxes():
  indices = np.arange(100, 132)  # 32 fast frames of a clip starting at stored frame 100
  window = transforms.CropWindow(0, 0, 8, 8, size=8, flip=False)
  # One box per fast frame k, covering column k % 2 (of 2), score 0.5 + k / 100.
  boxes = np.array([[100 + k, (k % 2) / 2, 0, (k % 2) / 2 + 0.1, 0.1, 0.5 + k / 100] for k in range(32)])
  slow = transforms.boxes_to_map(boxes, indices, 8, 8, window, (8, 1, 2), frames="slow_frames")
  expected = np.zeros((8, 1, 2), np.float32)
  for step, k in enumerate([0, 4, 8, 13, 17, 22, 26, 31]):
    expected[step, 0, k % 2] = 0.5 + k / 100
  np.testing.assert_allclose(slow, expected, rtol=1e-6)
  grouped = transforms.boxes_to_map(boxes, indices, 8, 8, window, (8, 1, 2), frames="max")
  np.testing.assert_allclose(grouped[1, 0], [0.5 + 6 / 100, 0.5 + 7 / 100], rtol=1e-6)  # frames 4-7
  with pytest.raises(ValueError, match="unknown interaction_frames"):
    transforms.boxes_to_map(boxes, indices, 8, 8, window, (8, 1, 2), frames="mean")


def test_released_clip_sampling_resamples_to_30_fps():
  # 30 fps: 8 x 8 frames at 30 fps span 64 stored frames; centre of 100 starts at (100 - 64) / 2 = 18.
  assert transforms.sample_frame_indices(100, 8, 8, None, fps=30, target_fps=30).tolist() == [
      18, 27, 36, 45, 54, 63, 72, 81]
  # 24 fps: span 64 x 24 / 30 = 51.2 frames from 24.4: linspace(24.4, 74.6, 8) truncated.
  assert transforms.sample_frame_indices(100, 8, 8, None, fps=24, target_fps=30).tolist() == [
      24, 31, 38, 45, 53, 60, 67, 74]
  # Short video: clamped to the last frame.
  assert transforms.sample_frame_indices(20, 8, 8, None, fps=30, target_fps=30).tolist() == [
      0, 9, 18, 19, 19, 19, 19, 19]
  rng = np.random.default_rng(0)
  for _ in range(50):
    got = transforms.sample_frame_indices(300, 8, 8, rng, fps=60, target_fps=30)  # span 128 frames
    assert 0 <= got[0] <= 300 - 128 and got[-1] - got[0] in (126, 127)
  # Test-time clips: clip i starts at delta i / N.
  assert transforms.evenly_spaced_clips(100, 8, 8, 2, fps=30, target_fps=30)[:, 0].tolist() == [0, 18]
  with pytest.raises(ValueError, match="needs the video's fps"):
    transforms.sample_frame_indices(100, 8, 8, None, fps=0, target_fps=30)
  # target_fps 0: the stride over stored frames, as before.
  assert transforms.sample_frame_indices(100, 8, 8, None).tolist() == list(range(21, 78, 8))


# --------------------------------------------------------------------------- loss totals per recipe


def bce(logits, targets):
  return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


def kl(student, teacher):
  log_s = student - np.log(np.sum(np.exp(student), -1, keepdims=True))
  log_t = teacher - np.log(np.sum(np.exp(teacher), -1, keepdims=True))
  return np.sum(np.exp(log_t) * (log_t - log_s), -1)


class PooledHeads(nn.Module):
  """A small stand-in for egoexo.Model with its output keys and shapes (pooled pixels -> BatchNorm -> dense
  heads), so the objective's weighting is checked without compiling a video backbone."""

  grid: tuple
  num_classes: int
  num_object_classes: int

  @nn.compact
  def __call__(self, clips, *, train):
    x = nn.BatchNorm(use_running_average=not train)(jnp.mean(clips, axis=(1, 2)).reshape(clips.shape[0], -1))
    maps = nn.Dense(int(np.prod(self.grid)) * 2)(x).reshape(x.shape[0], *self.grid, 2)
    return {"action": nn.Dense(self.num_classes)(x), "ego_score": nn.Dense(2)(x),
            "object": nn.Dense(self.num_object_classes)(x), "interaction": maps}


@pytest.mark.parametrize("recipe", common_recipe.RECIPES)
def test_egoexo_objective_total_per_recipe_against_numpy(recipe):
  config = tiny_config()
  common_recipe.apply_recipe(config, recipe_egoexo.ROWS, recipe, "egoexo", small=True)
  rng = np.random.default_rng(1)
  shapes = objectives.resolve(config).example_batch(config, 4)
  model = PooledHeads(shapes["interaction_map"].shape[1:4], config.model.num_classes["action"],
                      config.model.num_object_classes)
  objective = dataclasses.replace(objectives.resolve(config), model=model)  # the trainer's path with the stand-in
  batch = {k: (rng.integers(0, 255, s.shape).astype(np.uint8) if k == "clips" else
               rng.integers(0, config.model.num_classes["action"], s.shape).astype(np.int32) if k == "labels" else
               rng.uniform(size=s.shape).astype(np.float32) if k == "interaction_map" else
               np.ones(s.shape, np.float32) if k.startswith("has_") else rng.normal(size=s.shape).astype(np.float32))
           for k, s in shapes.items()}
  batch["has_interaction"][1] = 0.0  # one clip without detector output
  variables = train.init_variables(objective, config, jax.random.key(0))
  model_outputs, _ = train.apply_model(objective, variables["params"], variables["batch_stats"], batch, config=config,
                                       rng=jax.random.key(2))
  total, scalars = objective.loss(model_outputs, batch, config=config, rng=jax.random.key(2), mesh=None)
  outputs, _ = model.apply(variables, transforms.normalize_clips(batch["clips"], jnp.float32), train=True,
                           mutable=["batch_stats"])
  out = {k: np.asarray(v, np.float64) for k, v in outputs.items()}
  logits = out["action"]
  ce = np.mean(np.log(np.sum(np.exp(logits), -1)) - logits[np.arange(4), batch["labels"]])
  per_map = []
  keep = batch["has_interaction"] > 0
  for c in range(2):  # hand, object: each a BCE mean over the cells of the clips with boxes
    per_map.append(np.mean(bce(out["interaction"][keep, ..., c], batch["interaction_map"][keep, ..., c])))
  l_int = per_map[0] + per_map[1] if recipe == "released" else (per_map[0] + per_map[1]) / 2
  w_act = 0.5 if recipe == "released" else 1.0
  want = (w_act * ce + 0.1 * np.mean(kl(out["ego_score"], batch["ego_score_logits"]))
          + 0.5 * np.mean(kl(out["object"], batch["object_logits"])) + 1.0 * l_int)
  assert float(total) == pytest.approx(want, rel=1e-4)
  assert float(scalars["loss_interaction"]) == pytest.approx((per_map[0] + per_map[1]) / 2, rel=1e-4)
