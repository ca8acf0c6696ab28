"""The training loop: one trainer; the objective comes from the config.

Sections: data -> model and optimiser -> sharded state (restored if a checkpoint exists) ->
jitted step -> loop with logging, checkpoints and a stop on non-finite losses.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from egoexo_jax import checkpointing, losses, metrics, sharding
from egoexo_jax.input import pipelines, transforms
from egoexo_jax.models import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """Raised when a step's loss is NaN or infinite; the message names the step and the terms."""


# --------------------------------------------------------------------------- data


def prepare_records(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The record glob to train on; converts the embedded manifest into the workdir when none is set."""
  if config.data.train_records:
    return config.data.train_records
  prefix = os.path.join(workdir, "records", "train")
  pattern = prefix + ".tfrecord-*"
  if jax.process_index() == 0 and not os.path.exists(prefix + ".json"):
    from egoexo_jax.input import convert  # pylint: disable=g-import-not-at-top  (PyAV only when converting)

    logging.info("Converting %s into %s (short side %d).", config.data.manifest, prefix,
                 config.data.convert_short_side)
    report = convert.convert_manifest(
        config.data.manifest, prefix, short_side=config.data.convert_short_side,
        ego_logits=config.data.ego_logits or None, object_logits=config.data.object_logits or None,
        hand_object_dir=config.data.hand_object_dir or None, workers=max(1, config.data.num_workers))
    logging.info("Converted %d videos (%d skipped).", report.written, len(report.skipped))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("prepare_records")
  return pattern


# --------------------------------------------------------------------------- model and optimiser


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum, L2 weight decay on kernels, linear warm-up then cosine decay to zero.

  The learning rate scales linearly with the global batch (base rate per 64 clips, as PySlowFast).
  """
  opt = config.optimizer
  if not 0 <= opt.warmup_steps < config.num_train_steps:
    raise ValueError(f"config optimizer.warmup_steps ({opt.warmup_steps}) must be in [0, num_train_steps) "
                     f"(num_train_steps is {config.num_train_steps})")
  peak = opt.base_learning_rate * config.global_batch_size / 64
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=peak * opt.warmup_start_fraction, peak_value=peak,
      warmup_steps=opt.warmup_steps, decay_steps=config.num_train_steps, end_value=0.0)
  decay_kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  optimizer = optax.chain(
      optax.add_decayed_weights(opt.weight_decay, mask=decay_kernels),
      optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov),
  )
  return optimizer, schedule


def example_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one batch, for initialisation and ahead-of-time checks."""
  data, t, h, w = config.data, *pipelines.feature_grid(config)
  return {
      "clips": jax.ShapeDtypeStruct((batch_size, data.clip_length, data.crop_size, data.crop_size, 3), jnp.uint8),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "ego_logits": jax.ShapeDtypeStruct((batch_size, 2), jnp.float32),
      "object_logits": jax.ShapeDtypeStruct((batch_size, config.model.num_object_classes), jnp.float32),
      "interaction_map": jax.ShapeDtypeStruct((batch_size, t, h, w, 2), jnp.float32),
      "has_ego": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
      "has_object": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
      "has_interaction": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
  }


def init_state(model, optimizer, config, rng: jax.Array) -> TrainState:
  clips = jnp.zeros(example_batch(config, 1)["clips"].shape, jnp.float32)
  variables = model.init({"params": rng, "dropout": rng}, clips, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=optimizer.init(params))


# --------------------------------------------------------------------------- step


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, optimizer, schedule, config,
               rng: jax.Array) -> tuple[TrainState, metrics.EgoExoTrainMetrics, dict[str, jax.Array]]:
  """One SGD step on the global batch. Returns the new state, CLU metrics and the loss terms."""
  dropout_rng = jax.random.fold_in(rng, state.step)
  clips = transforms.normalize_clips(batch["clips"], jnp.dtype(config.model.dtype))
  loss_weights = {"ego": config.loss.weight_ego, "object": config.loss.weight_object,
                  "interaction": config.loss.weight_interaction}

  def loss_fn(params):
    outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, clips, train=True,
                                   rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    if "interaction" in outputs and outputs["interaction"].shape != batch["interaction_map"].shape:
      raise ValueError(f"interaction-map targets have shape {batch['interaction_map'].shape} but the model's "
                       f"res5 grid gives {outputs['interaction'].shape}; check data.crop_size/clip_length")
    missing = sorted(k for k, w in loss_weights.items() if w and k not in outputs)
    if missing:
      raise ValueError(f"loss weights {missing} are non-zero but the model has no such heads "
                       "(model.use_ego_heads is False): set their config.loss.weight_* to 0")
    total, terms = losses.egoexo_loss(outputs, batch, loss_weights, config.loss.temperature_ego,
                                      config.loss.temperature_object)
    return total, (terms, outputs["action"], updates["batch_stats"])

  (_, (terms, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  step_metrics = metrics.EgoExoTrainMetrics.single_from_model_output(
      loss=terms["total"], loss_action=terms["action"], loss_ego=terms["ego"], loss_object=terms["object"],
      loss_interaction=terms["interaction"], logits=logits, labels=batch["label"],
      learning_rate=schedule(state.step))
  return new_state, step_metrics, terms


def make_step_fn(model, optimizer, schedule, config, mesh, state_shardings):
  """The jitted, sharded train step: state replicated, batch split over `data`, state donated."""
  step = functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule, config=config,
                           rng=jax.random.key(config.seed + 1))
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh), sharding.replicated(mesh)),
                 donate_argnums=0)


def abstract_state(model, optimizer, config, mesh):
  """The state's shapes, dtypes and shardings, computed without initialising anything.

  Returns (a pytree of ShapeDtypeStructs carrying the shardings, the pytree of shardings).
  """
  abstract = jax.eval_shape(functools.partial(init_state, model, optimizer, config), jax.random.key(config.seed))
  state_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  return checkpointing.abstract_with_shardings(abstract, state_shardings), state_shardings


def create_sharded_state(model, optimizer, config, mesh):
  """Initialises the state directly in its shardings (no host copy); returns (state, shardings)."""
  _, state_shardings = abstract_state(model, optimizer, config, mesh)
  init = jax.jit(functools.partial(init_state, model, optimizer, config), out_shardings=state_shardings)
  return init(jax.random.key(config.seed)), state_shardings


def check_finite(step: int, terms: dict[str, jax.Array]) -> None:
  values = {k: float(v) for k, v in jax.device_get(terms).items()}
  if not np.isfinite(values["total"]):
    names = ["total"] + sorted(k for k in values if k != "total")
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: " + ", ".join(f"{k}={values[k]:.4g}" for k in names)
        + "; stopping without saving this state (the last checkpoint is intact)")


# --------------------------------------------------------------------------- loop


def write_summary(writer, step: int, config, train_metrics, elapsed: float, window_steps: int,
                  data_wait: float) -> None:
  """Writes the window's metrics and speed to TensorBoard and logs one progress line."""
  summary = {f"train/{k}": v for k, v in train_metrics.compute().items()}
  summary["train/steps_per_sec"] = window_steps / elapsed
  summary["train/clips_per_sec"] = window_steps * config.global_batch_size / elapsed
  summary["train/data_wait_fraction"] = data_wait / elapsed
  writer.write_scalars(step, summary)
  eta = (config.num_train_steps - step) / summary["train/steps_per_sec"]
  logging.info("step %d/%d  loss %.4f (act %.4f ego %.4f obj %.4f int %.4f)  acc %.3f  lr %.4g  "
               "%.2f steps/s  %.1f clips/s  data wait %.0f%%  ETA %dm%02ds", step, config.num_train_steps,
               summary["train/loss"], summary["train/loss_action"], summary["train/loss_ego"],
               summary["train/loss_object"], summary["train/loss_interaction"], summary["train/accuracy"],
               summary["train/learning_rate"], summary["train/steps_per_sec"], summary["train/clips_per_sec"],
               100 * summary["train/data_wait_fraction"], eta // 60, eta % 60)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains until `config.num_train_steps`, resuming from the newest checkpoint in `workdir`."""
  workdir = os.path.abspath(workdir)
  mesh = sharding.make_mesh(config.mesh.num_devices)
  sharding.check_batch_divisible(config.global_batch_size, mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})

  record_pattern = prepare_records(config, workdir)
  dataset = pipelines.make_train_dataset(config, record_pattern, process_index=jax.process_index(),
                                         process_count=jax.process_count())
  data_iterator = iter(dataset)

  model = build_model(config.model)
  optimizer, schedule = make_optimizer(config)
  manager = checkpointing.make_manager(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                       async_save=config.async_checkpointing)
  abstract, state_shardings = abstract_state(model, optimizer, config, mesh)
  restored = checkpointing.restore_latest(manager, abstract, data_iterator)
  if restored is not None:
    state, start_step = restored
    logging.info("Resumed from step %d (state and data iterator).", start_step)
  else:
    state, state_shardings = create_sharded_state(model, optimizer, config, mesh)
    start_step = 0
    if config.get("init_from"):
      params, batch_stats = checkpointing.load_backbone(config.init_from, state.params, state.batch_stats)
      state = jax.device_put(state.replace(params=params, batch_stats=batch_stats), state_shardings)
      logging.info("Backbone initialised from %s.", config.init_from)
  param_count = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model %s: %.2fM parameters; mesh %s; global batch %d.", config.model.name, param_count / 1e6,
               dict(mesh.shape), config.global_batch_size)

  step_fn = make_step_fn(model, optimizer, schedule, config, mesh, state_shardings)
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer)
  train_metrics, previous = None, None
  window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0

  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      tick = time.perf_counter()
      batch = sharding.host_batch_to_global(next(data_iterator), mesh)
      data_wait += time.perf_counter() - tick
      state, step_metrics, terms = step_fn(state, batch)
      # Check the previous step's loss only now, so the host never stalls the device queue.
      if previous is not None:
        check_finite(*previous)
      previous = (step, terms)
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      window_steps += 1
      report_progress(step)

      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        check_finite(*previous)
        write_summary(writer, step, config, train_metrics, time.perf_counter() - window_start, window_steps,
                      data_wait)
        train_metrics, window_start, window_steps, data_wait = None, time.perf_counter(), 0, 0.0

      if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        check_finite(*previous)
        checkpointing.save(manager, step, state, data_iterator)
  finally:
    manager.wait_until_finished()  # an async save in flight completes even when training fails
    manager.close()
    if hasattr(data_iterator, "close"):
      data_iterator.close()  # stops Grain worker processes
    writer.flush()
  return state
