"""Losses against plain float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egoexo_jax import losses
from testlib import (np_decoupled, np_decoupled_cross_view, np_info_nce, np_normalize, np_semantic_alignment,
                     np_semantic_weights)

B, K = 6, 11
MASK = np.array([1, 0, 1, 1, 0, 1], np.float32)


def np_softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_weighted_mean(per_example, weights):
  if weights is None:
    return per_example.mean()
  return (weights * per_example).sum() / max(weights.sum(), 1e-8)


def np_cross_entropy(logits, labels, weights):
  probs = np_softmax(logits.astype(np.float64))
  return np_weighted_mean(-np.log(probs[np.arange(len(labels)), labels]), weights)


def np_soft_target_kl(student, teacher, temperature, weights):
  p = np_softmax(teacher.astype(np.float64) / temperature)
  q = np_softmax(student.astype(np.float64) / temperature)
  return np_weighted_mean((p * (np.log(p) - np.log(q))).sum(axis=-1) * temperature**2, weights)


def np_bce(logits, targets, weights):
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  per_cell = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
  return np_weighted_mean(per_cell.reshape(len(per_cell), -1).mean(axis=1), weights)


def random_inputs(seed=0):
  rng = np.random.default_rng(seed)
  return dict(
      logits=rng.normal(0, 3, (B, K)).astype(np.float32),
      teacher=rng.normal(0, 3, (B, K)).astype(np.float32),
      labels=rng.integers(0, K, B).astype(np.int32),
      map_logits=rng.normal(0, 3, (B, 2, 3, 3, 2)).astype(np.float32),
      map_targets=rng.uniform(0, 1, (B, 2, 3, 3, 2)).astype(np.float32),
  )


@pytest.mark.parametrize("weights", [None, MASK])
def test_softmax_cross_entropy_matches_numpy(weights):
  x = random_inputs()
  got = losses.softmax_cross_entropy(x["logits"], x["labels"], weights)
  np.testing.assert_allclose(got, np_cross_entropy(x["logits"], x["labels"], weights), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("weights", [None, MASK])
def test_soft_target_kl_matches_numpy(temperature, weights):
  x = random_inputs()
  got = losses.soft_target_kl(x["logits"], x["teacher"], temperature, weights)
  np.testing.assert_allclose(got, np_soft_target_kl(x["logits"], x["teacher"], temperature, weights), rtol=1e-5)


def test_soft_target_kl_scales_with_temperature_squared():
  x = random_inputs()
  temperature = 3.0
  unscaled = losses.soft_target_kl(x["logits"] / temperature, x["teacher"] / temperature, 1.0)
  np.testing.assert_allclose(losses.soft_target_kl(x["logits"], x["teacher"], temperature),
                             temperature**2 * unscaled, rtol=1e-5)


def test_soft_target_kl_is_zero_when_student_equals_teacher():
  x = random_inputs()
  np.testing.assert_allclose(losses.soft_target_kl(x["teacher"], x["teacher"], 2.0), 0.0, atol=1e-6)


def test_soft_target_kl_ignores_teacher_classes_of_zero_probability():
  x = random_inputs()
  teacher = x["teacher"].copy()
  teacher[:, 0] = -np.inf
  got = losses.soft_target_kl(x["logits"], teacher, 2.0)
  p = np_softmax(teacher.astype(np.float64) / 2.0)[:, 1:]
  q = np_softmax(x["logits"].astype(np.float64) / 2.0)[:, 1:]
  np.testing.assert_allclose(got, 4.0 * np.mean((p * (np.log(p) - np.log(q))).sum(axis=1)), rtol=1e-5)


@pytest.mark.parametrize("weights", [None, MASK])
def test_interaction_map_bce_matches_numpy(weights):
  x = random_inputs()
  got = losses.interaction_map_bce(x["map_logits"], x["map_targets"], weights)
  np.testing.assert_allclose(got, np_bce(x["map_logits"], x["map_targets"], weights), rtol=1e-5)


def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
  x = random_inputs()
  no_signal = np.zeros(B, np.float32)
  loss, grad = jax.value_and_grad(lambda s: losses.soft_target_kl(s, x["teacher"], 2.0, no_signal))(x["logits"])
  assert loss == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_bfloat16_logits_give_float32_losses():
  x = random_inputs()
  logits = jnp.asarray(x["logits"], jnp.bfloat16)
  got = losses.softmax_cross_entropy(logits, x["labels"])
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_cross_entropy(np.asarray(logits, np.float32), x["labels"], None), rtol=1e-5)
  map_logits = jnp.asarray(x["map_logits"], jnp.bfloat16)
  assert losses.interaction_map_bce(map_logits, x["map_targets"]).dtype == jnp.float32
  assert losses.soft_target_kl(logits, x["teacher"], 2.0).dtype == jnp.float32


def egoexo_example(seed=0):
  x = random_inputs(seed)
  rng = np.random.default_rng(seed + 1)
  outputs = {"action": x["logits"], "ego_score": rng.normal(0, 2, (B, 2)).astype(np.float32),
             "object": rng.normal(0, 2, (B, 20)).astype(np.float32), "interaction": x["map_logits"]}
  batch = {"labels": x["labels"], "ego_score_logits": rng.normal(0, 2, (B, 2)).astype(np.float32),
           "object_logits": rng.normal(0, 2, (B, 20)).astype(np.float32), "interaction_map": x["map_targets"],
           "has_ego_score": MASK, "has_object": np.ones(B, np.float32), "has_interaction": MASK[::-1].copy()}
  return outputs, batch


def test_egoexo_loss_total_is_the_weighted_sum_of_the_terms():
  outputs, batch = egoexo_example()
  weights = {"ego_score": 0.1, "object": 0.5, "interaction": 1.0}
  total, terms = losses.egoexo_loss(outputs, batch, weights, temperature_ego=2.0, temperature_object=4.0)
  want = {
      "action": np_cross_entropy(outputs["action"], batch["labels"], None),
      "ego_score": np_soft_target_kl(outputs["ego_score"], batch["ego_score_logits"], 2.0, batch["has_ego_score"]),
      "object": np_soft_target_kl(outputs["object"], batch["object_logits"], 4.0, batch["has_object"]),
      "interaction": np_bce(outputs["interaction"], batch["interaction_map"], batch["has_interaction"]),
  }
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
  weighted_sum = want["action"] + sum(weights[k] * want[k] for k in weights)
  np.testing.assert_allclose(total, weighted_sum, rtol=1e-5)
  assert terms["total"] is total
  assert all(v.dtype == jnp.float32 for v in terms.values())


def test_egoexo_loss_released_recipe_sums_the_hand_and_object_map_means():
  # Released: 0.5 CE + 0.1 KL_ego + 0.5 KL_obj + 1.0 (BCE mean of the hand map + BCE mean of the object map),
  # each map's mean taken on its own over the clips that carry boxes (handobj_models.cal_handobj_loss).
  outputs, batch = egoexo_example()
  weights = {"ego_score": 0.1, "object": 0.5, "interaction": 1.0}
  total, terms = losses.egoexo_loss(outputs, batch, weights, 1.0, 1.0, action_weight=0.5,
                                    interaction_reduction="sum")
  keep = batch["has_interaction"] > 0
  logits, targets = outputs["interaction"][keep].astype(np.float64), batch["interaction_map"][keep]
  bce = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
  hand, obj = bce[..., 0].mean(), bce[..., 1].mean()
  want = (0.5 * np_cross_entropy(outputs["action"], batch["labels"], None)
          + 0.1 * np_soft_target_kl(outputs["ego_score"], batch["ego_score_logits"], 1.0, batch["has_ego_score"])
          + 0.5 * np_soft_target_kl(outputs["object"], batch["object_logits"], 1.0, batch["has_object"])
          + 1.0 * (hand + obj))
  np.testing.assert_allclose(total, want, rtol=1e-5)
  np.testing.assert_allclose(terms["interaction"], (hand + obj) / 2, rtol=1e-5)  # reported per cell
  assert losses.interaction_term_scale("mean") == 1.0
  with pytest.raises(ValueError, match="unknown interaction-map reduction 'max'"):
    losses.interaction_term_scale("max")


def test_egoexo_loss_skips_zero_weight_terms():
  outputs, batch = egoexo_example()
  action_only = {"action": outputs["action"]}  # a computed ego term would raise KeyError
  total, terms = losses.egoexo_loss(action_only, batch, {"ego_score": 0.0, "object": 0.0}, 2.0, 4.0)
  assert set(terms) == {"action", "ego_score", "object", "interaction", "total"}
  assert terms["ego_score"] == terms["object"] == terms["interaction"] == 0.0
  np.testing.assert_allclose(total, terms["action"])
  with pytest.raises(KeyError):
    losses.egoexo_loss(action_only, batch, {"ego_score": 0.1}, 2.0, 4.0)
  with pytest.raises(ValueError, match="unknown loss weights"):
    losses.egoexo_loss(outputs, batch, {"interation": 1.0}, 2.0, 4.0)


def test_egoexo_loss_gradients_are_finite_under_jit():
  outputs, batch = egoexo_example()
  outputs = {k: 30.0 * v for k, v in outputs.items()}  # saturated logits
  weights = {"ego_score": 0.1, "object": 0.5, "interaction": 1.0}

  @jax.jit
  def loss_fn(outputs):
    return losses.egoexo_loss(outputs, batch, weights, 2.0, 4.0)[0]

  grads = jax.grad(loss_fn)(outputs)
  for name, grad in grads.items():
    assert np.all(np.isfinite(grad)), name
    assert np.any(grad != 0), name


# --------------------------------------------------------------------------- SUM-L


def suml_inputs(seed=0, size=8, dim=16, text_noise=1.0):
  """Projections and narration embeddings; pairs share part of their text, so similarities spread over [-1, 1]."""
  rng = np.random.default_rng(seed)
  z_f, z_t = (np_normalize(rng.normal(size=(size, dim))).astype(np.float32) for _ in range(2))
  base = rng.normal(size=(size, dim))
  d_f = np_normalize(base + text_noise * rng.normal(size=(size, dim))).astype(np.float32)
  d_t = np_normalize(base + text_noise * rng.normal(size=(size, dim))).astype(np.float32)
  return z_f, z_t, d_f, d_t


SUML_MASK = np.array([1, 1, 0, 1, 0, 1, 1, 0], np.float32)


@pytest.mark.parametrize("mask", [None, SUML_MASK])
def test_info_nce_matches_numpy(mask):
  z_f, z_t, _, _ = suml_inputs()
  np.testing.assert_allclose(losses.info_nce(z_f, z_t, 0.06, mask), np_info_nce(z_f, z_t, 0.06, mask), rtol=1e-5)


@pytest.mark.parametrize("mask", [None, SUML_MASK])
def test_decoupled_info_nce_matches_numpy(mask):
  z_f, z_t, _, _ = suml_inputs()
  w = np.random.default_rng(3).uniform(0.2, 2.0, len(z_f)).astype(np.float32)
  np.testing.assert_allclose(losses.decoupled_info_nce(z_f, z_t, 0.06, mask), np_decoupled(z_f, z_t, 0.06, mask),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.decoupled_info_nce(z_f, z_t, 0.1, mask, w), np_decoupled(z_f, z_t, 0.1, mask, w),
                             rtol=1e-5)


def test_semantic_weights_match_numpy_and_average_one():
  _, _, d_f, d_t = suml_inputs()
  got = np.asarray(losses.semantic_weights(d_f, d_t, 0.1, SUML_MASK))
  np.testing.assert_allclose(got, np_semantic_weights(d_f, d_t, 0.1, SUML_MASK), rtol=1e-5)
  assert got[SUML_MASK == 0].tolist() == [0.0, 0.0, 0.0]
  np.testing.assert_allclose(got[SUML_MASK > 0].mean(), 1.0, rtol=1e-6)
  # sigma 0.001 overflows exp() in a plain formula; the softmax form stays finite.
  assert np.all(np.isfinite(losses.semantic_weights(d_f, d_t, 0.001)))


@pytest.mark.parametrize("passing", [8, 5, 2])
def test_semantic_alignment_loss_matches_numpy(passing):
  z_f, z_t, d_f, d_t = suml_inputs()
  similarity = np.sort((d_f * d_t).sum(1))
  threshold = similarity[-passing] - 1e-4  # exactly `passing` pairs are above it
  loss, count = losses.semantic_alignment_loss(z_f, z_t, d_f, d_t, temperature=0.06, sigma=0.1, threshold=threshold)
  want, want_count = np_semantic_alignment(z_f, z_t, d_f, d_t, 0.06, 0.1, threshold)
  assert float(count) == want_count == passing
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert want > 0


def test_semantic_alignment_loss_is_zero_with_fewer_than_two_pairs():
  z_f, z_t, d_f, d_t = suml_inputs()
  similarity = (d_f * d_t).sum(1)
  above_all_but_best = np.sort(similarity)[-2] + 1e-4  # exactly one pair passes
  loss_fn = lambda z: losses.semantic_alignment_loss(z, z_t, d_f, d_t, temperature=0.06, sigma=0.1,
                                                     threshold=above_all_but_best)
  (loss, count), grad = jax.value_and_grad(loss_fn, has_aux=True)(z_f)
  assert float(count) == 1.0 and float(loss) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_video_text_loss_is_four_decoupled_terms():
  z_f, z_t, d_f, d_t = suml_inputs()
  want = (np_decoupled(z_f, d_f, 0.06) + np_decoupled(d_f, z_f, 0.06) + np_decoupled(z_t, d_t, 0.06)
          + np_decoupled(d_t, z_t, 0.06))
  np.testing.assert_allclose(losses.video_text_loss(z_f, z_t, d_f, d_t, 0.06), want, rtol=1e-5)


def test_suml_total_is_eq_12():
  terms = {"ego_task": 1.5, "exo_task": 2.0, "align": 30.0, "video_text": 40.0}
  weights = {"exo_task": 0.1, "align": 0.02, "video_text": 0.1}
  np.testing.assert_allclose(losses.suml_total(terms, weights), 1.5 + 0.2 + 0.6 + 4.0, rtol=1e-6)
  assert losses.suml_total({"ego_task": 1.5}, {"exo_task": 0.0, "align": 0.0, "video_text": 0.0}) == 1.5


def test_triplet_margin_loss_matches_numpy():
  z_f, z_t, d_f, _ = suml_inputs()
  distance = lambda x, y: np.linalg.norm(x.astype(np.float64) - y, axis=1)
  want = np.maximum(distance(z_f, z_t) - distance(z_f, d_f) + 0.1, 0).mean()
  np.testing.assert_allclose(losses.triplet_margin_loss(z_f, z_t, d_f, 0.1), want, rtol=1e-5)
  assert float(losses.triplet_margin_loss(z_f, z_f, -z_f, 0.1)) == 0.0  # positive at 0, negative at 2


def test_multi_label_bce_matches_numpy():
  x = random_inputs()
  targets = (x["teacher"] > 0).astype(np.float32)
  np.testing.assert_allclose(losses.multi_label_bce(x["logits"], targets), np_bce(x["logits"], targets, None),
                             rtol=1e-5)


def test_decoupled_info_nce_gradient_matches_finite_differences():
  z_f, z_t, d_f, d_t = (x.astype(np.float64) for x in suml_inputs(size=6, dim=5))
  w = np.random.default_rng(1).uniform(0.5, 1.5, 6)
  mask = np.array([1, 1, 0, 1, 1, 1], np.float64)
  from jax.test_util import check_grads  # pylint: disable=g-import-not-at-top  (jax.test_util loads on import)
  with jax.enable_x64(True):
    fn = lambda a, p: losses.decoupled_info_nce(a, p, 0.2, mask, w)
    assert losses.decoupled_info_nce(jnp.asarray(z_f), jnp.asarray(z_t), 0.2).dtype == jnp.float64
    check_grads(fn, (jnp.asarray(z_f), jnp.asarray(z_t)), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-6)
    aligned = lambda a, p: losses.semantic_alignment_loss(a, p, jnp.asarray(d_f), jnp.asarray(d_t), temperature=0.2,
                                                          sigma=0.1, threshold=-1.0)[0]
    check_grads(aligned, (jnp.asarray(z_f), jnp.asarray(z_t)), order=1, modes=("rev",), eps=1e-6, atol=1e-7,
                rtol=1e-6)


@pytest.mark.parametrize("mask", [None, SUML_MASK])
def test_decoupled_info_nce_cross_view_matches_numpy(mask):
  z_f, z_t, _, _ = suml_inputs()
  w = np.random.default_rng(3).uniform(0.2, 2.0, len(z_f)).astype(np.float32)
  for weights in (None, w):
    got = losses.decoupled_info_nce(z_f, z_t, 0.06, mask, weights, negatives="cross_view")
    np.testing.assert_allclose(got, np_decoupled_cross_view(z_f, z_t, 0.06, mask, weights), rtol=1e-5)
  # The two forms differ on the same inputs: the released one adds same-view negatives to each denominator.
  both = float(losses.decoupled_info_nce(z_f, z_t, 0.06, mask, negatives="both_views"))
  cross = float(losses.decoupled_info_nce(z_f, z_t, 0.06, mask, negatives="cross_view"))
  assert both > cross + 0.1, (both, cross)
  with pytest.raises(ValueError, match="unknown decoupled InfoNCE negatives 'same_view'"):
    losses.decoupled_info_nce(z_f, z_t, 0.06, negatives="same_view")


@pytest.mark.parametrize("negatives", ["cross_view", "both_views"])
@pytest.mark.parametrize("weighted", [True, False])
def test_semantic_alignment_loss_forms_match_numpy(negatives, weighted):
  z_f, z_t, d_f, d_t = suml_inputs()
  threshold = np.sort((d_f * d_t).sum(1))[-5] - 1e-4  # 5 pairs pass
  selected = ((d_f.astype(np.float64) * d_t).sum(1) > threshold).astype(np.float64)
  w = np_semantic_weights(d_f, d_t, 0.1, selected) if weighted else None
  dcl = np_decoupled_cross_view if negatives == "cross_view" else np_decoupled
  want = dcl(z_f, z_t, 0.06, selected, w) + dcl(z_t, z_f, 0.06, selected, w)
  loss, count = losses.semantic_alignment_loss(z_f, z_t, d_f, d_t, temperature=0.06, sigma=0.1, threshold=threshold,
                                               negatives=negatives, weighted=weighted)
  assert float(count) == 5
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_video_text_loss_cross_view_is_four_cross_view_terms():
  z_f, z_t, d_f, d_t = suml_inputs()
  dcl = np_decoupled_cross_view
  want = dcl(z_f, d_f, 0.06) + dcl(d_f, z_f, 0.06) + dcl(z_t, d_t, 0.06) + dcl(d_t, z_t, 0.06)
  np.testing.assert_allclose(losses.video_text_loss(z_f, z_t, d_f, d_t, 0.06, negatives="cross_view"), want,
                             rtol=1e-5)


def test_cross_view_decoupled_info_nce_gradient_matches_finite_differences():
  z_f, z_t, _, _ = (x.astype(np.float64) for x in suml_inputs(size=5, dim=4))
  from jax.test_util import check_grads  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    fn = lambda a, p: losses.decoupled_info_nce(a, p, 0.2, negatives="cross_view")
    check_grads(fn, (jnp.asarray(z_f), jnp.asarray(z_t)), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------- EVGAP: CLIP pairs, SigLIP groups


def np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_clip_pair_loss(ego, exo, log_scale):
  logits = np.exp(min(log_scale, np.log(100.0))) * np_unit(ego) @ np_unit(exo).T
  labels = np.arange(len(ego))
  return 0.5 * (np_cross_entropy(logits, labels, None) + np_cross_entropy(logits.T, labels, None))


def np_siglip_group_loss(ego, exo, log_scale, bias):
  scenes, m, _ = ego.shape
  n = exo.shape[1]
  e, x = np_unit(ego.reshape(scenes * m, -1)), np_unit(exo.reshape(scenes * n, -1))
  total = 0.0
  for i in range(scenes * m):  # explicit double loop: y = +1 for windows of the same scene
    for j in range(scenes * n):
      y = 1.0 if i // m == j // n else -1.0
      z = np.exp(log_scale) * e[i] @ x[j] + bias
      total += np.log1p(np.exp(-y * z))
  return total / (scenes * m)


def evgap_inputs(scenes=8, m=2, n=3, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(scenes, m, dim)).astype(np.float32), rng.normal(size=(scenes, n, dim)).astype(np.float32)


@pytest.mark.parametrize("log_scale", [0.0, 2.0, 6.0])  # 6 > ln 100: CLIP's clip at 100 applies
def test_clip_pair_loss_matches_numpy(log_scale):
  ego, exo = (x[:, 0] for x in evgap_inputs(scenes=7))
  got = losses.clip_pair_loss(ego, exo, np.float32(log_scale))
  np.testing.assert_allclose(got, np_clip_pair_loss(ego, exo, log_scale), rtol=1e-5)
  # A perfect alignment at a large scale costs almost nothing.
  assert float(losses.clip_pair_loss(ego, ego, np.float32(4.6))) < 1e-3


@pytest.mark.parametrize("log_scale,bias", [(np.log(10.0), -10.0), (np.log10(1 / 0.7), 0.0), (1.0, -2.0)])
def test_siglip_group_loss_matches_numpy(log_scale, bias):
  ego, exo = evgap_inputs()
  got = losses.siglip_group_loss(ego, exo, np.float32(log_scale), np.float32(bias))
  np.testing.assert_allclose(got, np_siglip_group_loss(ego, exo, log_scale, bias), rtol=1e-5)


def test_siglip_group_loss_hand_worked():
  # Two scenes, one ego and one exo window each, orthogonal unit vectors; t = 1, b = 0.
  # Logits: same scene <e, x> = 1 (y = +1), other scene 0 (y = -1): per ego window ln(1 + e^-1) + ln 2.
  ego = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], np.float32)
  got = losses.siglip_group_loss(ego, ego, np.float32(0.0), np.float32(0.0))
  np.testing.assert_allclose(got, np.log1p(np.exp(-1.0)) + np.log(2.0), rtol=1e-6)


def np_evgap_eq2(ego, exo, log_scale):
  """EVGAP Eq. 2 written out: no bias, -1/(B^2 M N) sum over every (ego window, exo window) pair."""
  scenes, m, _ = ego.shape
  n = exo.shape[1]
  e, x = np_unit(ego), np_unit(exo)
  total = 0.0
  for a in range(scenes):
    for b in range(scenes):
      y = 1.0 if a == b else -1.0
      for i in range(m):
        for j in range(n):
          total += np.log1p(np.exp(-y * np.exp(log_scale) * e[a, i] @ x[b, j]))
  return total / (scenes**2 * m * n)


@pytest.mark.parametrize("log_scale", [np.log10(1 / 0.7), 1.0, 3.0])
def test_evgap_eq2_matches_numpy(log_scale):
  ego, exo = evgap_inputs(scenes=5, m=3, n=4, dim=6, seed=7)
  want = np_evgap_eq2(ego, exo, log_scale)
  np.testing.assert_allclose(losses.evgap_group_loss(ego, exo, np.float32(log_scale)), want, rtol=1e-5)
  # The same as the SigLIP form with b = 0 and the 'pairs' normalisation; SigLIP's differs by B N.
  np.testing.assert_allclose(losses.siglip_group_loss(ego, exo, np.float32(log_scale), np.float32(0.0), "pairs"),
                             want, rtol=1e-5)
  np.testing.assert_allclose(losses.siglip_group_loss(ego, exo, np.float32(log_scale), np.float32(0.0)),
                             want * 5 * 4, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown group loss normalization 'images'"):
    losses.siglip_group_loss(ego, exo, np.float32(log_scale), np.float32(0.0), "images")


def test_evgap_eq2_at_step_2_init_scale_prefers_collapsed_views_to_aligned_scenes():
  """Why Eq. 2 (no bias) separates the views at t = 1.17 (configs/evgap_group.py): with B = 16 scenes
  (one positive in 16 pairs) every ego window at u and every exo window at -u costs less than ego and
  exo of each scene equal and scenes orthogonal. Closed forms, softplus(z) = ln(1 + e^z):
  collapsed (softplus(t) + 15 softplus(-t)) / 16, aligned (softplus(-t) + 15 ln 2) / 16."""
  scenes, t = 16, np.exp(np.log10(1 / 0.7))
  log_scale = np.float32(np.log10(1 / 0.7))
  softplus = lambda z: np.log1p(np.exp(z))
  u = np.zeros((scenes, 1, scenes), np.float32)
  u[..., 0] = 1.0
  collapsed = losses.evgap_group_loss(u, -u, log_scale)
  aligned_views = np.eye(scenes, dtype=np.float32)[:, None, :]
  aligned = losses.evgap_group_loss(aligned_views, aligned_views, log_scale)
  np.testing.assert_allclose(collapsed, (softplus(t) + 15 * softplus(-t)) / 16, rtol=1e-5)
  np.testing.assert_allclose(aligned, (softplus(-t) + 15 * np.log(2)) / 16, rtol=1e-5)
  assert collapsed < 0.6 * aligned  # 0.343 against 0.667
  # At CLIP's start t = 1/0.07 the aligned scenes cost less.
  clip = np.float32(np.log(1 / 0.07))
  assert losses.evgap_group_loss(aligned_views, aligned_views, clip) < losses.evgap_group_loss(u, -u, clip)


def test_evgap_eq2_per_device_on_8_devices_is_the_mean_of_each_device_numpy_loss():
  from egoexo_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(8, fsdp=2)
  ego, exo = evgap_inputs(scenes=16, m=2, n=3, dim=5, seed=11)
  log_scale = np.float32(np.log10(1 / 0.7))
  per_device = lambda e, x, s: losses.siglip_group_loss_sharded(e, x, s, np.float32(0.0), mesh=mesh, scope="local",
                                                                normalization="pairs")
  got, grads = jax.jit(jax.value_and_grad(per_device, argnums=(0, 1, 2)))(ego, exo, log_scale)
  # Each device holds 2 consecutive scenes (the batch axis split over data x fsdp in order); no
  # negatives cross devices.
  want = np.mean([np_evgap_eq2(ego[2 * d:2 * d + 2], exo[2 * d:2 * d + 2], float(log_scale)) for d in range(8)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(got) - np_evgap_eq2(ego, exo, float(log_scale))) > 1e-3  # not the global mean
  mean_of_slices = lambda e, x, s: jnp.mean(jnp.stack([losses.evgap_group_loss(e[2 * d:2 * d + 2], x[2 * d:2 * d + 2], s)
                                                       for d in range(8)]))
  for g, w in zip(grads, jax.grad(mean_of_slices, argnums=(0, 1, 2))(ego, exo, log_scale)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
  # The global ring with the 'pairs' normalisation is the global mean over all (B M) x (B N) pairs.
  ring = jax.jit(lambda e, x, s: losses.siglip_group_loss_sharded(e, x, s, np.float32(0.0), mesh=mesh, scope="global",
                                                                  normalization="pairs"))
  np.testing.assert_allclose(ring(ego, exo, log_scale), np_evgap_eq2(ego, exo, float(log_scale)), rtol=1e-5)


def test_auxiliary_layers_weigh_earlier_layers():
  per_layer = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  np.testing.assert_allclose(losses.with_auxiliary_layers(per_layer, 0.2), 4.0 + 0.2 * 6.0, rtol=1e-6)


def siglip_on_slices(ego, exo, log_scale, bias, devices):
  """The dense formula on each device's slice of scenes, averaged (the 'local' scope's definition)."""
  size = ego.shape[0] // devices
  return jnp.mean(jnp.stack([losses.siglip_group_loss(ego[d * size:(d + 1) * size], exo[d * size:(d + 1) * size],
                                                      log_scale, bias) for d in range(devices)]))


@pytest.mark.parametrize("scope,tile_rows,fsdp", [("global", 0, 1), ("global", 2, 2), ("local", 0, 1), ("local", 4, 2)])
def test_sharded_siglip_matches_dense_values_and_gradients_on_8_devices(scope, tile_rows, fsdp):
  from egoexo_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(8, fsdp=fsdp)  # the scenes split over data x fsdp, as the trainer splits batches
  ego, exo = evgap_inputs(scenes=16, m=2, n=3, dim=6, seed=3)
  scalars = (np.float32(1.3), np.float32(-2.5))
  sharded = lambda e, x, s, b: losses.siglip_group_loss_sharded(e, x, s, b, mesh=mesh, scope=scope, tile_rows=tile_rows)
  reference = losses.siglip_group_loss if scope == "global" else (
      lambda e, x, s, b: siglip_on_slices(e, x, s, b, 8))
  got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(ego, exo, *scalars)
  want = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(ego, exo, *scalars)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  if scope == "global":  # and the global scope is the global formula, not the per-slice one
    assert abs(float(got[0]) - float(siglip_on_slices(ego, exo, *scalars, 8))) > 1e-3


def test_sharded_siglip_never_holds_the_global_logit_matrix():
  from egoexo_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(8)
  ego, exo = evgap_inputs(scenes=16, m=2, n=3, dim=5)  # dim 5: no array dimension is mistaken for a logit one
  fn = lambda e, x: losses.siglip_group_loss_sharded(e, x, np.float32(1.0), np.float32(0.0), mesh=mesh)

  def shapes_in(jaxpr, inside, found):
    """Shapes of every array the per-device program (inside shard_map) makes, forward and backward."""
    for eqn in jaxpr.eqns:
      here = inside or eqn.primitive.name == "shard_map"
      if inside:
        found.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else [param]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            shapes_in(inner, here, found)
    return found

  shapes = shapes_in(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(ego, exo).jaxpr, False, set())
  block = (2 * 2, 2 * 3)  # (b M) x (b N) with b = 2 scenes per device
  assert block in shapes
  assert not {(16 * 2, 16 * 3), (2 * 2, 16 * 3), (16 * 2, 2 * 3)} & shapes  # no global or row-global logits
  assert not [s for s in shapes if len(s) > 2 and s[-2:] == block]  # no stack of blocks kept for the backward
