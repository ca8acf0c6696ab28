"""Ego-Exo pre-training (Eq. 7) and plain single-label video classification on the same records.

Loss: w_act L_act + w_ego_score L_ego_score + w_object L_object + w_interaction L_int (config.loss:
weight_action, interaction_reduction; configs/recipe_egoexo.py); with the teacher weights at 0 and
model.use_ego_heads False it is plain action cross-entropy (the Ego-Score view classifier).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from egoexo_jax import losses
from egoexo_jax.input import egoexo_pipeline, prepared_records
from egoexo_jax.models import build_model
from egoexo_jax.objectives import Objective


def objective(config) -> Objective:
  model = build_model(config.model, "egoexo")
  grid = functools.cache(lambda: interaction_grid(model, config))  # traced when first needed

  def make_dataset(config, workdir: str, *, process_index: int, process_count: int):
    return egoexo_pipeline.make_train_dataset(config, prepared_records.train_records(config, workdir),
                                              process_index=process_index, process_count=process_count, grid=grid())

  return Objective(name="egoexo", model=model, make_dataset=make_dataset,
                   example_batch=lambda config, batch_size: example_batch(config, batch_size, grid()),
                   model_inputs=model_inputs, loss=loss)


def interaction_grid(model, config) -> tuple[int, int, int]:
  """The (t, h, w) grid of `model`'s interaction map (its pathway-0 feature grid) for the configured clip,
  which the input pipeline draws the hand and object maps on (Slow-only R50 at 8 x 224^2: (8, 7, 7);
  SlowFast: the slow pathway's T / alpha). Traced from the model (shapes only, jax.eval_shape); a model
  without the map head gives its backbone's pathway-0 grid (the maps are then drawn but not used).
  The one place the grid is computed: the input layer takes it as an argument (egoexo_pipeline,
  finetune_pipeline); callers without an objective pass `objectives.resolve(config).model`."""
  from egoexo_jax.models.backbones import build_backbone  # pylint: disable=g-import-not-at-top

  data = config.data
  clips = jax.ShapeDtypeStruct((1, data.clip_length, data.crop_size, data.crop_size, 3), jnp.float32)
  init = lambda module: jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x, train=False), clips)[0]
  outputs = init(model)
  if "interaction" in outputs:
    return tuple(int(n) for n in outputs["interaction"].shape[1:4])
  pathways = init(build_backbone(model.backbone, model.backbone_args, name=None))
  return tuple(int(n) for n in pathways[0].shape[1:4])


def example_batch(config, batch_size: int, grid: tuple[int, int, int]) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one batch of the Ego-Exo pipeline; `grid` the interaction map's (t, h, w)."""
  data, (t, h, w) = config.data, grid
  return {
      "clips": jax.ShapeDtypeStruct((batch_size, data.clip_length, data.crop_size, data.crop_size, 3), jnp.uint8),
      "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "ego_score_logits": jax.ShapeDtypeStruct((batch_size, 2), jnp.float32),
      "object_logits": jax.ShapeDtypeStruct((batch_size, config.model.num_object_classes), jnp.float32),
      "interaction_map": jax.ShapeDtypeStruct((batch_size, t, h, w, 2), jnp.float32),
      "has_ego_score": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
      "has_object": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
      "has_interaction": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
  }


def model_inputs(batch) -> tuple:
  return (batch["clips"],)


def check_interaction_shape(outputs, batch) -> None:
  """The interaction-map targets must lie on the model's grid (Ego-Exo and Ego-Exo* fine-tuning)."""
  if "interaction" in outputs and outputs["interaction"].shape != batch["interaction_map"].shape:
    raise ValueError(f"interaction-map targets have shape {batch['interaction_map'].shape} but the model's "
                     f"pathway-0 grid gives {outputs['interaction'].shape}; check data.crop_size/clip_length")


def loss(outputs, batch, *, config, rng: jax.Array, mesh):
  """Eq. 7 on the global batch. Scalars: loss, loss_action, loss_ego_score, loss_object, loss_interaction
  (unweighted terms, L_int as its BCE per cell; a term whose weight is 0 is reported as 0) and accuracy
  (action top-1)."""
  del rng, mesh  # the global batch is one array; XLA inserts the cross-device reductions
  loss_weights = {"ego_score": config.loss.weight_ego_score, "object": config.loss.weight_object,
                  "interaction": config.loss.weight_interaction}
  check_interaction_shape(outputs, batch)
  missing = sorted(k for k, w in loss_weights.items() if w and k not in outputs)
  if missing:
    raise ValueError(f"loss weights {missing} are non-zero but the model has no such heads "
                     "(model.use_ego_heads is False): set their config.loss.weight_* to 0")
  total, terms = losses.egoexo_loss(outputs, batch, loss_weights, config.loss.temperature_ego,
                                    config.loss.temperature_object,
                                    action_weight=config.loss.get("weight_action", 1.0),
                                    interaction_reduction=config.loss.get("interaction_reduction", "mean"))
  scalars = {"loss" if name == "total" else f"loss_{name}": value for name, value in terms.items()}
  scalars["accuracy"] = jnp.mean(jnp.argmax(outputs["action"], -1) == batch["labels"]).astype(jnp.float32)
  return total, scalars
