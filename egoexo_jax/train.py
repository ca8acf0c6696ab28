"""The training loop: one trainer; the method is an Objective (egoexo_jax/objectives/) resolved once.

setup(config, workdir) -> Run: the objective and its model, data, optimiser, the state's layout (computed
once), the state (restored, or initialised sharded), the jitted step. loop(run, stop_signals): steps with
logging (LogWindow), checks of the loss, evaluation between steps, checkpoints and a stop on signals.

The step (train_step): the trainer applies the objective's model to `objective.model_inputs(batch)` (video
clips normalised here, BatchNorm statistics updated here: apply_model) and differentiates
`objective.loss(outputs, batch, ...)`.

Batches come from the objective's Grain stream with a timeout (config.data.batch_timeout_s); their
host-only keys (stream.HOST_KEYS: record ids, skipped-record counts) stay on the host, and name the
records of a batch whose loss is not finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from egoexo_jax import checkpointing, console, metrics, monitoring, objectives, processes, run_config, run_lock, sharding
from egoexo_jax.input import device_resize, stream, transforms
from egoexo_jax.lr_policy import resolve_run_length
from egoexo_jax.objectives import Objective
from egoexo_jax.optimizer import make_optimizer
from egoexo_jax.train_log import LogWindow, banner, write_summary


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """Raised when a step's loss is NaN or infinite; the message names the step and the terms."""


# --------------------------------------------------------------------------- model, state and step


def apply_model(objective: Objective, params, batch_stats, batch: dict, *, config, rng: jax.Array):
  """The objective's model in train mode on `objective.model_inputs(batch)`, clip patches resized
  (input/device_resize.py, data.resize='device'), uint8 inputs (video clips) normalised to
  config.model.dtype, dropout from `rng`. Returns (outputs, updated batch_stats)."""
  batch = device_resize.resize_batch(batch, config.data.get("crop_size"))
  inputs = [transforms.normalize_clips(x, jnp.dtype(config.model.dtype)) if x is not None and x.dtype == jnp.uint8
            else x for x in objective.model_inputs(batch)]
  variables = {"params": params, "batch_stats": batch_stats}
  outputs, updates = objective.model.apply(variables, *inputs, train=True, rngs={"dropout": rng},
                                           mutable=["batch_stats"])
  return outputs, updates.get("batch_stats", batch_stats)


def step_rngs(objective: Objective, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(dropout key, loss key) of a step's key (objectives.Objective.split_rng)."""
  if objective.split_rng:
    dropout_rng, loss_rng = jax.random.split(rng)
    return dropout_rng, loss_rng
  return rng, rng


def init_variables(objective: Objective, config, rng: jax.Array) -> dict:
  """{'params', 'batch_stats'?}: the model initialised on zero inputs shaped as the objective's example
  batch (one example; clips as float32)."""
  example = {k: jnp.zeros(v.shape, jnp.float32 if v.dtype == jnp.uint8 else v.dtype)
             for k, v in objective.example_batch(config, 1).items()}
  return objective.model.init({"params": rng, "dropout": rng}, *objective.model_inputs(example), train=False)


def init_state(objective: Objective, optimizer, config, rng: jax.Array) -> TrainState:
  """The initial variables (init_variables) and the optimiser's state."""
  variables = init_variables(objective, config, rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=optimizer.init(params))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, objective: Objective, optimizer, schedule, config,
               mesh, rng: jax.Array) -> tuple[TrainState, Any, dict[str, jax.Array]]:
  """One optimiser step on the global batch. Returns the new state, CLU metrics and the scalars
  (losses per term, accuracies) of the objective."""
  dropout_rng, loss_rng = step_rngs(objective, jax.random.fold_in(rng, state.step))

  def loss_fn(params):
    outputs, batch_stats = apply_model(objective, params, state.batch_stats, batch, config=config, rng=dropout_rng)
    total, scalars = objective.loss(outputs, batch, config=config, rng=loss_rng, mesh=mesh)
    return total, (scalars, batch_stats)

  (_, (scalars, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics.train_metrics(scalars, schedule(state.step)), scalars


def make_step_fn(objective: Objective, optimizer, schedule, config, mesh, state_shardings):
  """The jitted, sharded train step: state in `state_shardings`, batch split over `data`, state donated."""
  step = functools.partial(train_step, objective=objective, optimizer=optimizer, schedule=schedule, config=config,
                           mesh=mesh, rng=jax.random.key(config.seed + 1))
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh), sharding.replicated(mesh)),
                 donate_argnums=0)


def abstract_state(objective: Objective, optimizer, config, mesh):
  """The state's shapes, dtypes and shardings, computed without initialising anything.

  Returns (a pytree of ShapeDtypeStructs carrying the shardings, the pytree of shardings).
  """
  abstract = jax.eval_shape(functools.partial(init_state, objective, optimizer, config), jax.random.key(config.seed))
  # Parameters and optimiser state fully sharded over `fsdp` (replicated when fsdp = 1); BatchNorm replicated.
  state_shardings = sharding.train_state_shardings(
      abstract, mesh, config.mesh.get("fsdp_min_size", sharding.DEFAULT_FSDP_MIN_SIZE))
  return checkpointing.abstract_with_shardings(abstract, state_shardings), state_shardings


def create_sharded_state(objective: Objective, optimizer, config, mesh, state_shardings=None):
  """Initialises the state directly in its shardings (no host copy); returns (state, shardings).
  `state_shardings` from abstract_state when the caller has them (else computed here)."""
  if state_shardings is None:
    _, state_shardings = abstract_state(objective, optimizer, config, mesh)
  init = jax.jit(functools.partial(init_state, objective, optimizer, config), out_shardings=state_shardings)
  return init(jax.random.key(config.seed)), state_shardings


def parse_init_from(init_from: str) -> dict[str, tuple[str, str]]:
  """`config.init_from` -> {this run's parameter subtree: (checkpoint path, subtree there)}.

  Either a path (a workdir, its checkpoints/ folder or a step folder), whose 'backbone' starts this
  run's 'backbone'; or comma-separated `subtree=path[:subtree there]` entries (default 'backbone'
  there), e.g. SUM-L's 'ego_backbone=runs/k400,exo_backbone=runs/exo_stage:exo_backbone'.
  """
  if not init_from:
    return {}
  if "=" not in init_from:
    return {"backbone": (init_from, "backbone")}
  mapping = {}
  for entry in init_from.split(","):
    target, equals, source = entry.partition("=")
    path, _, source_subtree = source.partition(":")
    if not equals or not target or not path:
      raise ValueError(f"config init_from entry '{entry}' is not 'subtree=path[:subtree]'")
    mapping[target.strip()] = (path.strip(), source_subtree.strip() or "backbone")
  return mapping


def initialize_from_checkpoints(state: TrainState, config, state_shardings) -> TrainState:
  """Replaces parameter subtrees (and their BatchNorm statistics) by those of earlier runs, per
  `config.init_from` (parse_init_from). Other parameters, the heads of a new task, stay as initialised."""
  mapping = parse_init_from(config.get("init_from", ""))
  if not mapping:
    return state
  params, batch_stats = state.params, state.batch_stats
  for target, (path, source_subtree) in mapping.items():
    params, batch_stats = checkpointing.load_backbone(path, params, batch_stats, subtree=target,
                                                      source_subtree=source_subtree)
    logging.info("Parameters '%s' initialised from '%s' of %s.", target, source_subtree, path)
  return jax.device_put(state.replace(params=params, batch_stats=batch_stats), state_shardings)


NAMED_RECORDS = 32  # records of a non-finite batch named by file and id (each is read to find its id)


def check_finite(step: int, scalars: dict[str, jax.Array], record_ids: np.ndarray | None = None,
                 describe=None) -> None:
  """Raises NonFiniteLossError naming the step, every loss term and the batch's record ids (indices
  into the sorted record shards, every host's) and, with `describe` (index -> 'file#n (id ...)', the
  dataset's describe_record), the files and video ids of the first NAMED_RECORDS of them."""
  values = {k: float(v) for k, v in jax.device_get(scalars).items()}
  if not np.isfinite(values["loss"]):
    names = ["loss"] + sorted(k for k in values if k != "loss")
    records = ""
    if record_ids is not None:
      if jax.process_count() > 1:  # every process takes this branch at the same step: the loss is global
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        record_ids = multihost_utils.process_allgather(record_ids, tiled=True)
      ids = sorted(np.asarray(record_ids).tolist())
      records = f"; the batch's records (index into the sorted record shards): {ids}"
      if describe is not None:
        named = [describe(i) for i in dict.fromkeys(ids)]
        records += (f"; files and video ids: {', '.join(named[:NAMED_RECORDS])}"
                    + (f" and {len(named) - NAMED_RECORDS} more" if len(named) > NAMED_RECORDS else ""))
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: " + ", ".join(f"{k}={values[k]:.4g}" for k in names) + records
        + "; stopping without saving this state (the last checkpoint is intact)")


def split_host_keys(batch: dict) -> tuple[dict, dict]:
  """(device part, host part) of a host batch: stream.HOST_KEYS stay on the host."""
  host = {k: batch.pop(k) for k in stream.HOST_KEYS if k in batch}
  return batch, host


def global_sum(value: int) -> int:
  """The sum of `value` over all processes (collective when there are several)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


# --------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Run:
  """Everything a training run is made of, built once by setup (and what a start banner or a summary reads)."""
  config: ml_collections.ConfigDict  # with the run length resolved (resolve_run_length)
  workdir: str
  objective: Objective
  mesh: jax.sharding.Mesh
  writer: Any  # clu metric writer
  dataset: Any  # the objective's Grain stream (describe_record, when it has one, names records)
  data_iterator: Any
  describe_record: Any  # record index -> 'file#n (id ...)', or None
  checkpoints: checkpointing.CheckpointWriter
  state: TrainState
  state_shardings: Any
  start_step: int
  step_fn: Any
  schedule: optax.Schedule
  param_count: int


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Builds the run: objective, data, optimiser, the state's layout (once), the state (restored from the
  newest checkpoint, else initialised in its shardings and from `config.init_from`) and the jitted step."""
  # Imported here, not at module level: clu's writers import TensorFlow (slow, and absent on some GPU
  # images), which the step functions above, the benches and the tests of the step do not need.
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_batch_divisible(config.global_batch_size, mesh)
  writer = console.tensorboard_writer(workdir, jax.process_index())  # no second copy of each metric line
  changed = run_config.save(config, workdir)  # <workdir>/config.json + commands.txt (process 0); readers use it
  if changed:
    logging.warning("This start changes config %s from the previous start of this run.", ", ".join(changed))
  writer.write_hparams(run_config.flat_hparams(config))  # every config leaf, dotted names

  objective = objectives.resolve(config)
  dataset = objective.make_dataset(config, workdir, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  data_iterator = iter(dataset)
  data_stream = checkpointing.DataStream(data_iterator, config.global_batch_size)  # checkpoints record the layout
  config = resolve_run_length(config, workdir)  # epoch-based runs: num_train_steps from the record count

  optimizer, schedule = make_optimizer(config)
  checkpoints = checkpointing.CheckpointWriter(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                               async_save=config.async_checkpointing, data_stream=data_stream)
  abstract, state_shardings = abstract_state(objective, optimizer, config, mesh)
  checkpointing.check_free_space(checkpoints.directory, checkpointing.state_bytes(abstract))
  restored = checkpointing.restore_latest(checkpoints.manager, abstract, data_stream)
  if restored is not None:
    state, start_step = restored
    logging.info("Resumed from step %d (state and data iterator).", start_step)
  else:
    state, _ = create_sharded_state(objective, optimizer, config, mesh, state_shardings)
    start_step = 0
    state = initialize_from_checkpoints(state, config, state_shardings)
  param_count = sum(x.size for x in jax.tree.leaves(abstract.params))
  return Run(config=config, workdir=workdir, objective=objective, mesh=mesh, writer=writer, dataset=dataset,
             data_iterator=data_iterator, describe_record=getattr(dataset, "describe_record", None),
             checkpoints=checkpoints, state=state, state_shardings=state_shardings, start_step=start_step,
             step_fn=make_step_fn(objective, optimizer, schedule, config, mesh, state_shardings), schedule=schedule,
             param_count=param_count)


# --------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains until `config.num_train_steps`, resuming from the newest checkpoint in `workdir`.

  One trainer per workdir (run_lock, taken by process 0). SIGTERM or SIGINT: the run finishes its step,
  writes a checkpoint of it and raises monitoring.Stopped (SystemExit, status 128 + signal number).
  A checkpoint that cannot be written raises checkpointing.CheckpointSaveError at once; too little
  free disk for one checkpoint, checkpointing.DiskSpaceError before training starts.
  """
  workdir = os.path.abspath(workdir)
  lock = run_lock.RunLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, monitoring.StopSignals() as stop_signals:
    run = setup(config, workdir)
    return loop(run, stop_signals)


def loop(run: Run, stop_signals: monitoring.StopSignals) -> TrainState:
  """Trains `run` from its start step to config.num_train_steps; returns the final state."""
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top  (TensorFlow: see setup)
  from egoexo_jax import train_eval  # pylint: disable=g-import-not-at-top  (it imports evaluate, which imports train)
  config, state, checkpoints, objective = run.config, run.state, run.checkpoints, run.objective
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=run.writer)
  profile = monitoring.ProfileWindow(config.get("profile_steps", ()), run.workdir)
  between_steps = train_eval.TrainingEvaluation(config, run.workdir, objective, run.mesh, run.state_shardings)
  window, previous, final_metrics, run_start = LogWindow(config.num_train_steps), None, {}, time.perf_counter()
  try:
    if run.start_step >= config.num_train_steps:
      logging.info("%s", console.already_complete(run.start_step, config.num_train_steps,
                                                  os.path.join(checkpoints.directory, str(run.start_step))))
      return state
    logging.info("%s", banner(run))
    for step in range(run.start_step + 1, config.num_train_steps + 1):
      tick = time.perf_counter()
      batch, host = split_host_keys(monitoring.next_batch(run.data_iterator, config.data.get("batch_timeout_s", 0),
                                                          step))
      first = step == run.start_step + 1
      if first and jax.process_index() == 0:  # a few input clips with their targets, in TensorBoard
        from egoexo_jax import pictures  # pylint: disable=g-import-not-at-top  (matplotlib)
        pictures.write_input_clips(run.writer, step, device_resize.resize_batch(
            {key: value[:4] for key, value in batch.items()}, config.data.get("crop_size")))
        logging.info("Compiling the train step (the first step's time is left out of the speed and ETA).")
      batch = sharding.host_batch_to_global(batch, run.mesh)
      data_wait = time.perf_counter() - tick
      profile.before_step(step)
      state, step_metrics, terms = run.step_fn(state, batch)
      profile.after_step(step, terms)
      if previous is not None:  # the previous step's loss only now, so the host never stalls the device queue
        check_finite(*previous)
      previous = (step, terms, host.get(stream.RECORD_INDEX), run.describe_record)
      window.add(step_metrics, data_wait, int(np.sum(host.get(stream.SKIPPED_RECORDS, 0))))
      report_progress(step)
      last = step == config.num_train_steps
      log_now = step % config.log_every_steps == 0 or last
      if first:
        jax.block_until_ready(terms)
        logging.info("Step %d done (compilation included) in %.1f s.", step, time.perf_counter() - tick)
        if not log_now:
          window.exclude_compilation()

      if log_now:
        check_finite(*previous)
        extra = {"skipped_records": global_sum(window.skipped), **monitoring.memory_metrics()}
        if objective.evaluate is not None:  # an objective's optional held-out metrics
          extra.update(objective.evaluate(state.params, config, run.workdir))
        final_metrics = write_summary(run.writer, step, config, window, extra)
        window.reset()
      state = between_steps(step, state)  # precise BatchNorm statistics, periodic evaluation, best checkpoint
      if step % config.checkpoint_every_steps == 0 or last:
        check_finite(*previous)
        checkpoints.save(step, state)
      checkpoints.check()  # a failed async save stops the run now, not one interval later
      if stop_signals.requested(step) and not last:
        check_finite(*previous)
        checkpoints.save_now(step, state)
        raise stop_signals.stopped(step, checkpoints.directory)
  finally:
    profile.close()
    between_steps.close()
    checkpoints.close()  # an async save in flight completes even when training fails
    if hasattr(run.data_iterator, "close"):
      run.data_iterator.close()  # stops Grain worker processes
    processes.release_shared_memory()
    run.writer.flush()
  best, best_metric = console.read_best(between_steps.best_file)
  logging.info("%s", console.end_summary(
      final_metrics=final_metrics, wall_seconds=time.perf_counter() - run_start,
      steps_run=config.num_train_steps - run.start_step, num_steps=config.num_train_steps,
      last_checkpoint=os.path.join(checkpoints.directory, str(config.num_train_steps)),
      best_checkpoint=best, best_metric=best_metric))
  return state

