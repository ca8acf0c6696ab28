"""SUM-L: pair pipeline, two-encoder model, objective (global vs per-device negatives), stages (a)-(c).

Real data: the shipped clips with the hand-declared pairing of data/suml/ (ego.csv, exo.csv, pairs.npz).
"""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, apply_overrides
from testlib import np_decoupled, np_decoupled_cross_view, np_info_nce, np_normalize, np_semantic_alignment
from configs import recipe_suml
from configs import suml as suml_config
from configs import suml_eval as suml_eval_config
from configs import suml_exo as suml_exo_config
from egoexo_jax import objectives, run_config, sharding, suml_eval, train
from egoexo_jax.input import pair_files, suml_pipeline
from egoexo_jax.models import build_model
from egoexo_jax.models import suml as suml_model
from egoexo_jax.objectives import suml as objective
from egoexo_jax.pseudo_labels import narration_pairs

PAIRS = str(DATA / "suml" / "pairs.npz")
EGO_LABELS = {"box": 0, "cup": 1}
EXO_LABELS = {"tree": 0, "bikes": 1, "carphone": 2}


@pytest.fixture(scope="module", autouse=True)
def rbg_random_keys():
  """RBG keys compile several times faster than threefry on CPU (parameter init, dropout); restored after."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


@pytest.fixture(scope="module")
def suml_records(tmp_path_factory):
  """data/suml/ego.csv and exo.csv converted at short side 64: 9 ego and 8 exo real segments."""
  from egoexo_jax.input import convert
  out = tmp_path_factory.mktemp("suml_records")
  for view in ("ego", "exo"):
    convert.convert_manifest(str(DATA / "suml" / f"{view}.csv"), str(out / view), short_side=64)
  return str(out / "ego.tfrecord-*"), str(out / "exo.tfrecord-*")


def shrink(config, records=("", ""), **overrides):
  """A SUM-L config cut down to a few seconds per compiled step."""
  config.data.ego_records, config.data.exo_records = records
  config.data.update(clip_length=4, frame_stride=2, crop_size=32, min_short_side=40, max_short_side=48,
                     num_workers=0, read_threads=1)
  config.model.backbone_args.width = 4
  config.optimizer.schedule = "cosine"
  config.update(global_batch_size=8, num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                async_checkpointing=False)
  config.optimizer.warmup_steps = 1
  return apply_overrides(config, overrides)


def tiny(records=("", ""), arg="small", **overrides):
  return shrink(suml_config.get_config(arg), records, **overrides)


# --------------------------------------------------------------------------- pipeline


def test_pipeline_pairs_each_ego_clip_with_its_mined_exo_clip(suml_records):
  ego, exo = suml_records
  pairs = pair_files.load_pairs(PAIRS)
  config = tiny(suml_records)
  batch = next(iter(suml_pipeline.make_paired_dataset(config, ego, exo, with_exo=True, with_text=True)))
  assert batch["ego_clips"].shape == batch["exo_clips"].shape == (8, 4, 32, 32, 3)
  assert batch["ego_clips"].dtype == np.uint8 and batch["ego_text"].shape == (8, 384)
  # Which ego clip is each example? Its narration embedding says (the narrations are distinct).
  ego_rows = [int(np.flatnonzero(np.all(pairs.ego_embeddings == t, axis=1))[0]) for t in batch["ego_text"]]
  exo_rows = pairs.pair_indices[ego_rows, 0]  # top-1 partners
  np.testing.assert_array_equal(batch["exo_text"], pairs.exo_embeddings[exo_rows])
  ego_ids, exo_ids = pairs.ego_ids[ego_rows], pairs.exo_ids[exo_rows]
  assert batch["ego_labels"][:, 0].tolist() == [EGO_LABELS[i.split("_")[0]] for i in ego_ids]
  assert batch["exo_labels"][:, 0].tolist() == [EXO_LABELS[i.split("_")[0]] for i in exo_ids]


def test_top_k_partners_are_drawn_with_the_per_element_rng(suml_records):
  ego, exo = suml_records
  pairs = pair_files.load_pairs(PAIRS)
  config = tiny(suml_records, **{"data.pair_top_k": 3})
  make = lambda: iter(suml_pipeline.make_paired_dataset(config, ego, exo, with_exo=True, with_text=True))
  batches = [batch for batch, _ in zip(make(), range(3))]
  ranks = []
  for batch in batches:
    for ego_text, exo_text in zip(batch["ego_text"], batch["exo_text"]):
      row = int(np.flatnonzero(np.all(pairs.ego_embeddings == ego_text, axis=1))[0])
      candidates = [int(np.flatnonzero(np.all(pairs.exo_embeddings == exo_text, axis=1))[0])]
      ranks.append(list(pairs.pair_indices[row]).index(candidates[0]))  # ValueError if not a top-3 partner
  assert len(set(ranks)) > 1  # partners beyond the best one are drawn
  again = next(make())  # the same seed gives the same partners and crops
  for key in batches[0]:
    np.testing.assert_array_equal(again[key], batches[0][key])


def test_exo_stage_pipeline_yields_exo_clips_and_labels(suml_records):
  config = suml_exo_config.get_config("small")
  shrink(config, suml_records)
  batch, _ = train.split_host_keys(next(iter(suml_pipeline.make_exo_dataset(config, suml_records[1]))))
  assert set(batch) == {"exo_clips", "exo_labels"} and batch["exo_labels"].shape == (8, 1)
  assert set(batch["exo_labels"][:, 0]) <= {0, 1, 2}


def test_pairing_errors_name_the_clip_and_the_file(suml_records, tmp_path):
  ego, exo = suml_records
  config = tiny(suml_records)
  pairs = pair_files.load_pairs(PAIRS)
  keep = pairs.ego_ids != "cup_02"
  short = str(tmp_path / "short.npz")
  pair_files.save_pairs(short, pair_files.PairFile(
      ego_ids=pairs.ego_ids[keep], exo_ids=pairs.exo_ids, ego_narrations=pairs.ego_narrations[keep],
      exo_narrations=pairs.exo_narrations, ego_embeddings=pairs.ego_embeddings[keep],
      exo_embeddings=pairs.exo_embeddings, pair_indices=pairs.pair_indices[keep],
      pair_similarities=pairs.pair_similarities[keep], model=pairs.model, k=pairs.k))
  config.data.pairs = short
  missing_row = f"ego records .* no row in the pair file {re.escape(short)}.*'cup_02'"
  with pytest.raises(pair_files.PairingError, match=missing_row):
    suml_pipeline.make_paired_dataset(config, ego, exo, with_exo=True, with_text=True)

  true_pairs = tmp_path / "true_pairs.csv"
  true_pairs.write_text("ego_id,exo_id\n" + "".join(f"{e},tree_00\n" for e in pairs.ego_ids if e != "box_03")
                        + "box_03,no_such_clip\n")
  config.data.pairs = str(true_pairs)
  with pytest.raises(pair_files.PairingError, match=re.escape(
      f"exo clip 'no_such_clip', paired with ego clip 'box_03' in {true_pairs}, has no record in '{exo}'")):
    suml_pipeline.make_paired_dataset(config, ego, exo, with_exo=True, with_text=False)
  with pytest.raises(pair_files.PairingError, match="has no narration embeddings"):
    suml_pipeline.make_paired_dataset(config, ego, exo, with_exo=True, with_text=True)


def test_true_pair_csv_gives_each_ego_clip_its_declared_exo_clip():
  table = pair_files.load_pair_table(str(DATA / "suml" / "declared_true_pairs.csv"))
  declared = dict(line.split(",") for line in (DATA / "suml" / "declared_true_pairs.csv").read_text().split()[1:])
  assert {e: str(table.exo_ids[table.candidates[table.row(e), 0]]) for e in declared} == declared
  assert table.k == 1 and table.ego_text is None


def test_fpv_only_reads_no_exo_clips_and_no_pair_file(suml_records, tmp_path):
  config = tiny(suml_records, arg="small,fpv_only", **{"data.pairs": "/nonexistent.npz"})
  assert not objective.needs_exo(config) and not objective.needs_text(config)
  dataset = objective.make_dataset(config, str(tmp_path), process_index=0, process_count=1)
  assert set(train.split_host_keys(next(iter(dataset)))[0]) == {"ego_clips", "ego_labels"}


# --------------------------------------------------------------------------- model


def model_inputs(batch=2):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(size=(batch, 4, 32, 32, 3)), jnp.float32) for _ in range(2)]


def test_model_subtrees_outputs_and_switches():
  ego, exo = model_inputs()
  config = tiny()
  shapes = lambda model: jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), ego, exo, train=False))
  outputs, variables = shapes(build_model(config.model, "suml"))
  assert set(variables["params"]) == {"ego_backbone", "exo_backbone", "ego_projection", "exo_projection",
                                      "ego_head_0", "exo_head_0"}
  assert outputs["ego_embedding"].shape == outputs["exo_embedding"].shape == (2, 384)
  assert outputs["ego_logits"][0].shape == (2, 2) and outputs["exo_logits"][0].shape == (2, 3)
  config.model.share_backbone = True
  _, variables = shapes(build_model(config.model, "suml"))
  assert {"backbone", "ego_projection", "exo_projection"} <= set(variables["params"])
  assert not {"ego_backbone", "exo_backbone"} & set(variables["params"])
  config.model.share_backbone, config.model.discriminator_width = False, 16
  outputs, variables = shapes(build_model(config.model, "suml"))
  assert outputs["domain_logits"].shape == (4, 2) and "domain_discriminator" in variables["params"]
  config.model.update(share_backbone=True, freeze_exo_backbone=True)
  with pytest.raises(ValueError, match="freeze_exo_backbone needs separate encoders"):
    shapes(build_model(config.model, "suml"))


def test_projection_is_unit_norm():
  features = jnp.asarray(np.random.default_rng(0).normal(size=(3, 20)) * 50, jnp.float32)
  head = suml_model.ProjectionHead(384)
  embedding = head.apply(head.init(jax.random.key(0), features), features)
  assert embedding.shape == (3, 384)
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)


def test_gradient_reversal_flips_and_scales_the_gradient():
  x = jnp.arange(3.0)
  value, grad = jax.value_and_grad(lambda x: jnp.sum(suml_model.reverse_gradient(x, 0.5) * jnp.array([1., 2., 3.])))(x)
  assert float(value) == 8.0
  np.testing.assert_array_equal(grad, [-0.5, -1.0, -1.5])


# --------------------------------------------------------------------------- objective


class EmbeddingsFromClips:
  """Stands in for the SUM-L model in objective tests: each normalised clip, flattened and L2-normalised,
  is its embedding; task logits are zero; 'domain_logits' are the first two embedding values."""

  def apply(self, variables, ego, exo, *, train, rngs, mutable):
    del variables, train, rngs, mutable
    out = {}
    for view, clips in (("ego", ego), ("exo", exo)):
      flat = clips.reshape(clips.shape[0], -1)
      out[f"{view}_embedding"] = flat / jnp.linalg.norm(flat, axis=1, keepdims=True)
      out[f"{view}_logits"] = (jnp.zeros((clips.shape[0], 2)),)
    out["domain_logits"] = jnp.concatenate([out["ego_embedding"], out["exo_embedding"]])[:, :2]
    return out, {"batch_stats": {}}


def synthetic_batch(size=32, seed=0):
  """uint8 clips (size, 1, 4, 4, 3) -> 48-d embeddings, and 48-d narration embeddings that partly agree."""
  rng = np.random.default_rng(seed)
  clips = {v: rng.integers(0, 256, (size, 1, 4, 4, 3)).astype(np.uint8) for v in ("ego", "exo")}
  base = rng.normal(size=(size, 48))
  text = {v: np_normalize(base + rng.normal(size=(size, 48))).astype(np.float32) for v in ("ego", "exo")}
  batch = {"ego_clips": clips["ego"], "exo_clips": clips["exo"], "ego_text": text["ego"], "exo_text": text["exo"],
           "ego_labels": np.zeros((size, 1), np.int32), "exo_labels": np.zeros((size, 1), np.int32)}
  z = {v: np_normalize(((clips[v].reshape(size, -1) / 255.0 - 0.45) / 0.225)) for v in ("ego", "exo")}
  return batch, z["ego"], z["exo"]


def run_objective(config, batch, num_devices=8):
  mesh = sharding.make_mesh(num_devices)
  global_batch = sharding.host_batch_to_global(batch, mesh)
  stand_in = dataclasses.replace(objectives.resolve(config), model=EmbeddingsFromClips())

  def scalars(b):  # the trainer's path: train.apply_model, then the objective's loss
    dropout_rng, loss_rng = train.step_rngs(stand_in, jax.random.key(3))
    outputs, _ = train.apply_model(stand_in, {}, {}, b, config=config, rng=dropout_rng)
    return stand_in.loss(outputs, b, config=config, rng=loss_rng, mesh=mesh)[1]

  return jax.device_get(jax.jit(scalars)(global_batch))


def test_global_negatives_span_the_batch_and_per_device_negatives_each_slice():
  batch, z_f, z_t = synthetic_batch()
  d_f, d_t = batch["ego_text"], batch["exo_text"]
  threshold = float(np.median((d_f * d_t).sum(1)))
  # np_decoupled is the released (both-view) form; the paper form has its own test below.
  config = tiny(**{"loss.threshold": threshold, "global_batch_size": 32, "loss.dcl_negatives": "both_views"})
  tau, sigma = config.loss.temperature, config.loss.sigma
  l_m = lambda s: (np_decoupled(z_f[s], d_f[s], tau) + np_decoupled(d_f[s], z_f[s], tau)
                   + np_decoupled(z_t[s], d_t[s], tau) + np_decoupled(d_t[s], z_t[s], tau))
  l_aw = lambda s: np_semantic_alignment(z_f[s], z_t[s], d_f[s], d_t[s], tau, sigma, threshold)[0]

  global_terms = run_objective(config, batch)
  everything = slice(None)
  np.testing.assert_allclose(global_terms["loss_align"], l_aw(everything), rtol=2e-4)
  np.testing.assert_allclose(global_terms["loss_video_text"], l_m(everything), rtol=2e-4)
  np.testing.assert_allclose(global_terms["aligned_pair_fraction"], 0.5)

  config.loss.negatives = "per_device"
  local_terms = run_objective(config, batch)
  slices = [slice(4 * i, 4 * i + 4) for i in range(8)]  # 32 rows over 8 devices
  np.testing.assert_allclose(local_terms["loss_align"], np.mean([l_aw(s) for s in slices]), rtol=2e-4)
  np.testing.assert_allclose(local_terms["loss_video_text"], np.mean([l_m(s) for s in slices]), rtol=2e-4)
  assert abs(local_terms["loss_video_text"] - global_terms["loss_video_text"]) > 1.0  # fewer negatives, lower loss
  w = objective.loss_weights(config)
  np.testing.assert_allclose(local_terms["loss"], local_terms["loss_ego_task"] + w["exo_task"] * local_terms[
      "loss_exo_task"] + w["align"] * local_terms["loss_align"] + w["video_text"] * local_terms["loss_video_text"],
                             rtol=1e-5)


@pytest.mark.parametrize("baseline", ["info_nce", "typical_cl", "triplet", "joint_embed", "domain_adapt"])
def test_baseline_alignment_terms_match_numpy(baseline):
  batch, z_f, z_t = synthetic_batch(size=16)
  if baseline == "info_nce":
    config = tiny(**{"loss.alignment": "info_nce", "loss.weight_video_text": 0.0})
  else:
    config = tiny(arg=f"small,{baseline}")
  config.global_batch_size = 16
  config.loss.dcl_negatives = "both_views"  # np_decoupled's form (the paper form: test_recipe_loss_totals_match_numpy)
  got = run_objective(config, batch)["loss_align"]
  tau = config.loss.temperature
  distance = lambda x, y: np.linalg.norm(x - y, axis=1)
  triplet = lambda negatives: np.mean(np.maximum(distance(z_f, z_t) - distance(z_f, negatives) + 0.1, 0))
  if baseline == "info_nce":
    np.testing.assert_allclose(got, np_info_nce(z_f, z_t, tau) + np_info_nce(z_t, z_f, tau), rtol=2e-4)
  elif baseline == "typical_cl":
    np.testing.assert_allclose(got, np_decoupled(z_f, z_t, tau) + np_decoupled(z_t, z_f, tau), rtol=2e-4)
  elif baseline in ("triplet", "joint_embed"):
    pool = z_f if baseline == "triplet" else z_t  # negatives: another ego clip / another pair's exo clip
    candidates = [triplet(np.roll(pool, shift, axis=0)) for shift in range(1, 16)]
    assert np.min(np.abs(np.array(candidates) - got)) < 1e-5 * max(1.0, abs(got))
    assert abs(triplet(pool) - got) > 1e-3  # never the anchor itself
  else:
    logits = np.concatenate([z_f, z_t])[:, :2]
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(got, -np.mean(log_probs[np.arange(32), np.repeat([0, 1], 16)]), rtol=1e-5)


def test_sharded_step_equals_single_device_step(suml_records):
  """Real model and clips; L_aw and L_m over the global batch: 8 devices = 1 device."""
  config = tiny(suml_records)
  objective = objectives.resolve(config)
  optimizer, schedule = train.make_optimizer(config)
  dataset = suml_pipeline.make_paired_dataset(config, *suml_records, with_exo=True, with_text=True)
  batch, _ = train.split_host_keys(next(iter(dataset)))
  initial, _ = train.create_sharded_state(objective, optimizer, config, sharding.make_mesh(1))
  initial = jax.device_get(initial)
  results = []
  for num_devices in (1, 8):
    mesh = sharding.make_mesh(num_devices)
    state_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), initial)
    state = jax.device_put(initial, state_shardings)
    step_fn = train.make_step_fn(objective, optimizer, schedule, config, mesh, state_shardings)
    state, _, terms = step_fn(state, sharding.host_batch_to_global(batch, mesh))
    results.append(jax.device_get((state.params, state.batch_stats, terms)))
  single, sharded = results
  assert single[2]["loss_align"] > 0 and single[2]["loss_video_text"] > 0 and single[2]["aligned_pair_fraction"] >= 0.25
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("recipe", recipe_suml.RECIPES)
def test_recipe_loss_totals_match_numpy(recipe):
  """Each recipe's total against Eq. 12 written out in NumPy: paper = L_f + 0.1 L_t + 0.02 L_aw (w-weighted,
  cross-view denominators) + 0.1 L_m (cross-view), over the global batch; released = L_f + 0.1 L_t + 0.1 L_m
  (both-view denominators), the mean over 2 halves of the batch, no alignment term."""
  batch, z_f, z_t = synthetic_batch()
  d_f, d_t = batch["ego_text"], batch["exo_text"]
  threshold = float(np.median((d_f * d_t).sum(1)))
  config = tiny(arg=f"small,{recipe}", **{"loss.threshold": threshold, "global_batch_size": 32})
  terms = run_objective(config, batch)
  tau, sigma = config.loss.temperature, config.loss.sigma
  task = np.log(2.0)  # zero logits over 2 classes, for L_f and L_t
  if recipe == "paper":
    dcl = np_decoupled_cross_view
    selected = ((d_f.astype(np.float64) * d_t).sum(1) > threshold).astype(np.float64)
    e = np.exp((d_f.astype(np.float64) * d_t).sum(1) / sigma)
    w = np.where(selected > 0, e / e[selected > 0].mean(), 0.0)
    l_aw = dcl(z_f, z_t, tau, selected, w) + dcl(z_t, z_f, tau, selected, w)
    l_m = dcl(z_f, d_f, tau) + dcl(d_f, z_f, tau) + dcl(z_t, d_t, tau) + dcl(d_t, z_t, tau)
    want = task + 0.1 * task + 0.02 * l_aw + 0.1 * l_m
    np.testing.assert_allclose(terms["loss_align"], l_aw, rtol=2e-4)
  else:
    halves = (slice(0, 16), slice(16, 32))  # loss.negative_groups 2: the release's 2 GPUs x 32 clips
    l_m = np.mean([np_decoupled(z_f[s], d_f[s], tau) + np_decoupled(d_f[s], z_f[s], tau)
                   + np_decoupled(z_t[s], d_t[s], tau) + np_decoupled(d_t[s], z_t[s], tau) for s in halves])
    want = task + 0.1 * task + 0.1 * l_m
    assert "loss_align" not in terms
  np.testing.assert_allclose(terms["loss_video_text"], l_m, rtol=2e-4)
  np.testing.assert_allclose(terms["loss"], want, rtol=2e-4)


def test_multi_label_task_loss_is_a_sum_of_per_head_means():
  """The released L_t: BCE(25 verbs) + BCE(64 nouns), each a mean; 'mean_over_classes' is one mean over 89."""
  rng = np.random.default_rng(0)
  heads = (rng.normal(size=(4, 25)).astype(np.float32), rng.normal(size=(4, 64)).astype(np.float32))
  targets = (rng.uniform(size=(4, 89)) < 0.1).astype(np.float32)
  bce = lambda x, t: np.mean(np.logaddexp(0, x) - x * t)
  per_head = bce(heads[0], targets[:, :25]) + bce(heads[1], targets[:, 25:])
  one_mean = bce(np.concatenate(heads, 1), targets)
  got, _ = objective.task_loss(heads, targets, "multi_label", "exo", "sum_over_heads")
  np.testing.assert_allclose(got, per_head, rtol=1e-5)
  got, _ = objective.task_loss(heads, targets, "multi_label", "exo", "mean_over_classes")
  np.testing.assert_allclose(got, one_mean, rtol=1e-5)


def test_recipe_table_drives_the_configs_and_the_readme():
  for recipe in recipe_suml.RECIPES:
    for small in (False, True):
      config = suml_config.get_config(("small," if small else "") + recipe)
      objective.check_config(config)
      for row in recipe_suml.config_rows():
        value = config
        for name in row.key.split("."):
          value = value[name]
        want = row.value(recipe, small)
        assert (tuple(value) if isinstance(want, tuple) else value) == want, (recipe, small, row.key, value)
  assert suml_config.get_config("").loss.dcl_negatives == "cross_view"  # the paper's method is the default
  for row in recipe_suml.ROWS:
    assert row.source and (row.divergence or not row.ours), row.setting  # every deviation says why
  # Pair-mining rows are flags of the miner: both columns are choices it has; its default is what we use.
  mining, model = (next(r for r in recipe_suml.ROWS if r.key == f"narration_pairs --{f}") for f in ("mining", "model"))
  assert {mining.paper, mining.released} == set(narration_pairs.MINING_METHODS)
  assert narration_pairs.MINING_METHODS[0] == mining.value("paper")
  assert narration_pairs.RELEASED_MODEL.endswith(model.released)
  assert narration_pairs.DEFAULT_MODEL == model.value("paper")
  readme = (DATA.parent / "README.md").read_text()
  assert recipe_suml.markdown_table() in readme
  with pytest.raises(ValueError, match="unknown config argument 'small,paper,released'"):
    suml_config.get_config("small,paper,released")


def test_label_mined_partners_are_drawn_among_each_rows_candidates(suml_records, tmp_path):
  """A label-mined pair file: rows with 1 candidate always give it; rows with 3 draw among all 3."""
  ego, exo = suml_records
  pairs = pair_files.load_pairs(PAIRS)
  counts = np.array([1, 3] * 4 + [1], np.int32)[:len(pairs.ego_ids)]
  labelled = dataclasses.replace(pairs, mining="labels", pair_counts=counts,
                                 pair_rules=np.where(counts == 1, 2, 1).astype(np.int8))
  pair_files.save_pairs(str(tmp_path / "labels.npz"), labelled)
  config = tiny(suml_records, **{"data.pair_top_k": 3, "data.pairs": str(tmp_path / "labels.npz")})
  dataset = iter(suml_pipeline.make_paired_dataset(config, ego, exo, with_exo=True, with_text=True))
  ranks = {1: set(), 3: set()}
  for batch, _ in zip(dataset, range(4)):
    for ego_text, exo_text in zip(batch["ego_text"], batch["exo_text"]):
      row = int(np.flatnonzero(np.all(pairs.ego_embeddings == ego_text, axis=1))[0])
      exo_row = int(np.flatnonzero(np.all(pairs.exo_embeddings == exo_text, axis=1))[0])
      ranks[int(counts[row])].add(list(pairs.pair_indices[row]).index(exo_row))
  assert ranks[1] == {0} and len(ranks[3]) > 1


# --------------------------------------------------------------------------- stages and configs


def test_two_stage_run_on_the_shipped_clips_then_ego_evaluation(suml_records, tmp_path):
  """(a) exo encoder alone -> (b) joint, exo side from (a) and frozen -> (c) ego evaluation JSON."""
  stage_a = shrink(suml_exo_config.get_config("small"), suml_records)
  state_a = train.train_and_evaluate(stage_a, str(tmp_path / "a"))
  stage_b = tiny(suml_records, **{"model.freeze_exo_backbone": True, "optimizer.frozen": ("exo_backbone",),
                                  "init_from": f"exo_backbone={tmp_path / 'a'}:exo_backbone,"
                                               f"exo_head_0={tmp_path / 'a'}:exo_head_0"})
  state_b = train.train_and_evaluate(stage_b, str(tmp_path / "b"))
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2"]
  # The frozen exo encoder is exactly stage (a)'s, BatchNorm statistics included; the rest trained.
  for collection in ("params", "batch_stats"):
    for a, b in zip(jax.tree.leaves(getattr(state_a, collection)["exo_backbone"]),
                    jax.tree.leaves(getattr(state_b, collection)["exo_backbone"])):
      np.testing.assert_array_equal(a, b)
  assert not np.allclose(state_a.params["exo_head_0"]["linear"]["kernel"],
                         state_b.params["exo_head_0"]["linear"]["kernel"])

  # (c) from the workdir alone (the config stage (b) saved); a config without (b)'s overrides names them.
  stage_c = shrink(suml_eval_config.get_config("small"), suml_records)
  with pytest.raises(run_config.ConfigMismatchError, match=r"model.freeze_exo_backbone: saved true, given false; "
                                                           r"optimizer.frozen: saved \["):
    suml_eval.evaluate(stage_c, str(tmp_path / "b"))
  result = suml_eval.evaluate(None, str(tmp_path / "b"))
  assert result["num_records"] == 9 and 0.0 <= result["metrics"]["top1"] <= 1.0
  assert result["checkpoint"].endswith(os.path.join("checkpoints", "2"))
  assert json.loads((tmp_path / "b" / "suml_eval.json").read_text()) == result


def test_configs_defaults_baselines_and_checks():
  full = suml_config.get_config("")
  assert (full.loss.weight_exo_task, full.loss.weight_align, full.loss.weight_video_text) == (0.1, 0.02, 0.1)
  # threshold: SUM-L's 0.5 re-derived for the shipped text encoder (configs/recipe_suml.py)
  assert (full.loss.temperature, full.loss.sigma, full.loss.threshold) == (0.06, 0.1, 0.78)
  assert full.model.projection_dim == 384
  assert full.model.ego_num_classes.to_dict() == {"verb": 97, "noun": 300} and full.data.exo_label_kind == "multi_label"
  for baseline in suml_config.BASELINES:
    for arg in (baseline, f"small,{baseline}"):
      objective.check_config(suml_config.get_config(arg))
  assert not objective.needs_exo(suml_config.get_config("fpv_only"))
  assert suml_exo_config.get_config("small").stage == "exo"
  with pytest.raises(ValueError, match="unknown config argument 'small,tiny'"):
    suml_config.get_config("small,tiny")
  broken = suml_config.get_config("small,joint_embed")
  broken.data.pairs = PAIRS
  with pytest.raises(ValueError, match="joint_embedding' trains on true pairs"):
    objective.check_config(broken)
  broken = suml_config.get_config("small")
  broken.model.freeze_exo_backbone = True
  with pytest.raises(ValueError, match="optimizer.frozen lacks 'exo_backbone'"):
    objective.check_config(broken)


def test_evaluation_metrics_against_hand_worked_examples():
  logits = [np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), np.array([[0.0, 1.0, 2.0]] * 3)]
  labels = np.array([[0, 2], [0, 2], [0, 1]])
  metrics = suml_eval.classification_metrics(logits, labels, "single")
  assert metrics == {"top1_0": pytest.approx(2 / 3), "top1_1": pytest.approx(2 / 3), "top1": pytest.approx(1 / 3)}
  # mAP is evaluate.py's (tested against sklearn in evaluate_test.py); the multi-hot heads are laid end to end.
  # Class 0: AP 1; class 1: its positive ranks second, AP 1/2; class 2 has no positive and is dropped.
  heads = [np.array([[0.9, 0.9], [0.8, 0.7]]), np.array([[0.2], [0.6]])]
  targets = np.array([[1, 0, 0], [0, 1, 0]])
  assert suml_eval.classification_metrics(heads, targets, "multi_label") == {"mAP": pytest.approx(0.75)}
