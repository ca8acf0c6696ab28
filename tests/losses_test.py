"""Losses against plain float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egoexo_jax import losses

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
  outputs = {"action": x["logits"], "ego": rng.normal(0, 2, (B, 2)).astype(np.float32),
             "object": rng.normal(0, 2, (B, 20)).astype(np.float32), "interaction": x["map_logits"]}
  batch = {"label": x["labels"], "ego_logits": rng.normal(0, 2, (B, 2)).astype(np.float32),
           "object_logits": rng.normal(0, 2, (B, 20)).astype(np.float32), "interaction_map": x["map_targets"],
           "has_ego": MASK, "has_object": np.ones(B, np.float32), "has_interaction": MASK[::-1].copy()}
  return outputs, batch


def test_egoexo_loss_total_is_the_weighted_sum_of_the_terms():
  outputs, batch = egoexo_example()
  weights = {"ego": 0.1, "object": 0.5, "interaction": 1.0}
  total, terms = losses.egoexo_loss(outputs, batch, weights, temperature_ego=2.0, temperature_object=4.0)
  want = {
      "action": np_cross_entropy(outputs["action"], batch["label"], None),
      "ego": np_soft_target_kl(outputs["ego"], batch["ego_logits"], 2.0, batch["has_ego"]),
      "object": np_soft_target_kl(outputs["object"], batch["object_logits"], 4.0, batch["has_object"]),
      "interaction": np_bce(outputs["interaction"], batch["interaction_map"], batch["has_interaction"]),
  }
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
  weighted_sum = want["action"] + sum(weights[k] * want[k] for k in weights)
  np.testing.assert_allclose(total, weighted_sum, rtol=1e-5)
  assert terms["total"] is total
  assert all(v.dtype == jnp.float32 for v in terms.values())


def test_egoexo_loss_skips_zero_weight_terms():
  outputs, batch = egoexo_example()
  action_only = {"action": outputs["action"]}  # a computed ego term would raise KeyError
  total, terms = losses.egoexo_loss(action_only, batch, {"ego": 0.0, "object": 0.0}, 2.0, 4.0)
  assert set(terms) == {"action", "ego", "object", "interaction", "total"}
  assert terms["ego"] == terms["object"] == terms["interaction"] == 0.0
  np.testing.assert_allclose(total, terms["action"])
  with pytest.raises(KeyError):
    losses.egoexo_loss(action_only, batch, {"ego": 0.1}, 2.0, 4.0)
  with pytest.raises(ValueError, match="unknown loss weights"):
    losses.egoexo_loss(outputs, batch, {"interation": 1.0}, 2.0, 4.0)


def test_egoexo_loss_gradients_are_finite_under_jit():
  outputs, batch = egoexo_example()
  outputs = {k: 30.0 * v for k, v in outputs.items()}  # saturated logits
  weights = {"ego": 0.1, "object": 0.5, "interaction": 1.0}

  @jax.jit
  def loss_fn(outputs):
    return losses.egoexo_loss(outputs, batch, weights, 2.0, 4.0)[0]

  grads = jax.grad(loss_fn)(outputs)
  for name, grad in grads.items():
    assert np.all(np.isfinite(grad)), name
    assert np.any(grad != 0), name
