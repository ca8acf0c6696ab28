"""The training loop: one trainer; the objective comes from the config.

Sections: data -> model and optimiser -> sharded state (restored if a checkpoint exists) ->
jitted step -> loop with logging, checkpoints and a stop on non-finite losses.

Batches come from the objective's Grain stream with a timeout (config.data.batch_timeout_s); their
host-only keys (pipelines.HOST_KEYS: record ids, skipped-record counts) stay on the host, and name the
records of a batch whose loss is not finite.
"""

from __future__ import annotations

import contextlib
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

from egoexo_jax import (checkpointing, console, lr_policy, metrics, monitoring, objectives, processes, run_config,
                        run_lock, sharding)
from egoexo_jax.input import pipelines, sources
from egoexo_jax.models import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """Raised when a step's loss is NaN or infinite; the message names the step and the terms."""


# --------------------------------------------------------------------------- model and optimiser


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate per step.

  With `optimizer.lr_policy` ('cosine', 'steps_with_relative_lrs'): PySlowFast's policy, in epochs when
  config.epochs > 0 (egoexo_jax/lr_policy.py; resolve_run_length first sets num_train_steps). Otherwise,
  linear warm-up from `warmup_start_fraction` of the peak to the peak, then `optimizer.schedule`:
  'cosine' (to zero at num_train_steps; the default) or 'steps' (the peak multiplied by `decay_factor` at
  each step of `decay_steps`, as EPIC-Kitchens fine-tuning).

  The peak is `base_learning_rate`, scaled linearly with the global batch when
  `reference_batch_size` (default 64, PySlowFast's convention) is non-zero.
  """
  opt = config.optimizer
  if opt.get("lr_policy", ""):
    try:
      return lr_policy.make_schedule(config, lr_policy.plan(config))
    except lr_policy.RecordCountUnknown as e:  # restoring for evaluation needs only the optimiser's structure
      return lr_policy.unresolved_schedule(e)
  if not 0 <= opt.warmup_steps < config.num_train_steps:
    raise ValueError(f"config optimizer.warmup_steps ({opt.warmup_steps}) must be in [0, num_train_steps) "
                     f"(num_train_steps is {config.num_train_steps})")
  reference = opt.get("reference_batch_size", 64)
  peak = opt.base_learning_rate * (config.global_batch_size / reference if reference else 1.0)
  kind = opt.get("schedule", "cosine")
  if kind == "cosine":
    main = optax.cosine_decay_schedule(peak, config.num_train_steps - opt.warmup_steps)
  elif kind == "steps":
    boundaries = [int(b) - opt.warmup_steps for b in opt.decay_steps]
    if any(b <= 0 for b in boundaries) or boundaries != sorted(boundaries):
      raise ValueError(f"config optimizer.decay_steps {tuple(opt.decay_steps)} must increase and come after "
                       f"warm-up ({opt.warmup_steps} steps)")
    main = optax.piecewise_constant_schedule(peak, {b: opt.decay_factor for b in boundaries})
  else:
    raise ValueError(f"unknown config optimizer.schedule '{kind}': use 'cosine' or 'steps'")
  if not opt.warmup_steps:
    return main  # no zero-length warm-up schedule (optax: "non-positive transition_steps")
  warmup = optax.linear_schedule(peak * opt.warmup_start_fraction, peak, opt.warmup_steps)
  return optax.join_schedules([warmup, main], [opt.warmup_steps])


def resolve_run_length(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The run's length in steps, from epochs where the config gives epochs: with an lr_policy, num_train_steps =
  ceil(epochs x records / global batch) when epoch-based, and one log line describing the schedule. Records:
  data.num_train_examples, else counted in the training records, which is done too when periodic evaluation
  is given in epochs (train_eval.every_epochs with data.eval_records); the count goes into
  data.num_train_examples of the returned copy, where egoexo_jax/train_eval.py (and precise BN's one-epoch
  cap) read it. Otherwise `config` unchanged."""
  settings = config.get("train_eval", ml_collections.ConfigDict())
  eval_in_epochs = bool(config.data.get("eval_records", "")) and not settings.get("every_steps", 0) and \
      settings.get("every_epochs", 0) > 0
  policy = bool(config.optimizer.get("lr_policy", ""))
  num_records = 0
  if ((policy and lr_policy.is_epoch_based(config)) or eval_in_epochs) and not lr_policy.epoch_records(config):
    pattern = config.data.train_records or os.path.join(workdir, "records", "train.tfrecord-*")
    num_records = len(sources.open_records(pattern))
  if policy:
    config, plan = lr_policy.resolve(config, num_records)
    logging.info("%s", plan.describe(config))
  if num_records and not lr_policy.epoch_records(config):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.num_train_examples = num_records
    logging.info("Counted %d training records per epoch (data.num_train_examples was 0).", num_records)
  return config


def is_normalization_module(name: str) -> bool:
  """PySlowFast's test, "'bn' in the parameter's name", on one module name of our trees ('bn', 'bn_a',
  'shortcut_bn', 'bn1', 'BatchNorm_0'), extended to LayerNorm-style names ('norm', 'ln_1')."""
  tokens = [t.rstrip("0123456789") for t in name.lower().split("_")]
  return "norm" in name.lower() or "bn" in tokens or "ln" in tokens


def weight_decay_mask(weight_decay_on: str):
  """params -> pytree of bools: which parameters weight decay applies to (make_optimizer)."""
  if weight_decay_on == "kernels":
    return lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if weight_decay_on == "all_but_batchnorm":
    def mask(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: not any(is_normalization_module(str(getattr(k, "key", k))) for k in path[:-1]), params)
    return mask
  raise ValueError(f"unknown config optimizer.weight_decay_on '{weight_decay_on}': use 'kernels' or "
                   "'all_but_batchnorm'")


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser of `config.optimizer` and its learning-rate schedule (make_schedule).

  optimizer.name: 'sgd' (default; momentum, nesterov, L2 weight decay added to the gradient, as
  PySlowFast), 'adam' (beta1, beta2; L2 weight decay when non-zero) or 'adamw' (decoupled weight
  decay). optimizer.weight_decay_on: 'kernels' (default; arrays of 2 or more dimensions, not BatchNorm,
  LayerNorm or biases) or 'all_but_batchnorm' (PySlowFast's optimizer: every parameter outside a
  normalisation layer, biases included; see is_normalization_module). optimizer.frozen lists top-level
  parameter names (e.g. 'exo_backbone') that receive no updates at all.
  """
  opt = config.optimizer
  schedule = make_schedule(config)
  decay_mask = weight_decay_mask(opt.get("weight_decay_on", "kernels"))
  name = opt.get("name", "sgd")
  if name == "sgd":
    optimizer = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                            optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  elif name == "adam":
    optimizer = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                            optax.adam(schedule, b1=opt.get("beta1", 0.9), b2=opt.get("beta2", 0.999)))
  elif name == "adamw":
    optimizer = optax.adamw(schedule, b1=opt.get("beta1", 0.9), b2=opt.get("beta2", 0.999),
                            weight_decay=opt.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"unknown config optimizer.name '{name}': use 'sgd', 'adam' or 'adamw'")
  frozen = tuple(opt.get("frozen", ()))
  if frozen:
    def labels(params):
      unknown = sorted(set(frozen) - set(params))
      if unknown:
        raise ValueError(f"config optimizer.frozen names {unknown}, which are not top-level parameters "
                         f"(they are {sorted(params)})")
      return {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "trained", v) for k, v in params.items()}
    optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
  return optimizer, schedule


def init_state(model, optimizer, config, rng: jax.Array) -> TrainState:
  variables = objectives.get_objective(config.objective).init_variables(model, config, rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=optimizer.init(params))


# --------------------------------------------------------------------------- step


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, optimizer, schedule, config, mesh,
               rng: jax.Array) -> tuple[TrainState, Any, dict[str, jax.Array]]:
  """One optimiser step on the global batch. Returns the new state, CLU metrics and the scalars
  (losses per term, accuracies) of the objective."""
  objective = objectives.get_objective(config.objective)
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    return objective.loss(model, params, state.batch_stats, batch, config=config, rng=step_rng, mesh=mesh)

  (_, (scalars, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics.train_metrics(scalars, schedule(state.step)), scalars


def make_step_fn(model, optimizer, schedule, config, mesh, state_shardings):
  """The jitted, sharded train step: state in `state_shardings`, batch split over `data`, state donated."""
  step = functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule, config=config,
                           mesh=mesh, rng=jax.random.key(config.seed + 1))
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh), sharding.replicated(mesh)),
                 donate_argnums=0)


def abstract_state(model, optimizer, config, mesh):
  """The state's shapes, dtypes and shardings, computed without initialising anything.

  Returns (a pytree of ShapeDtypeStructs carrying the shardings, the pytree of shardings).
  """
  abstract = jax.eval_shape(functools.partial(init_state, model, optimizer, config), jax.random.key(config.seed))
  # Parameters and optimiser state fully sharded over `fsdp` (replicated when fsdp = 1); BatchNorm replicated.
  state_shardings = sharding.train_state_shardings(
      abstract, mesh, config.mesh.get("fsdp_min_size", sharding.DEFAULT_FSDP_MIN_SIZE))
  return checkpointing.abstract_with_shardings(abstract, state_shardings), state_shardings


def create_sharded_state(model, optimizer, config, mesh):
  """Initialises the state directly in its shardings (no host copy); returns (state, shardings)."""
  _, state_shardings = abstract_state(model, optimizer, config, mesh)
  init = jax.jit(functools.partial(init_state, model, optimizer, config), out_shardings=state_shardings)
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


def initialise_from_checkpoints(state: TrainState, config, state_shardings) -> TrainState:
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
  """(device part, host part) of a host batch: pipelines.HOST_KEYS stay on the host."""
  host = {k: batch.pop(k) for k in pipelines.HOST_KEYS if k in batch}
  return batch, host


def global_sum(value: int) -> int:
  """The sum of `value` over all processes (collective when there are several)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


# --------------------------------------------------------------------------- loop


def write_summary(writer, step: int, config, train_metrics, elapsed: float, window_steps: int,
                  data_wait: float, extra: dict[str, float] | None = None) -> dict[str, float]:
  """Writes the window's metrics, speed and `extra` scalars (skipped records, memory) to TensorBoard
  and logs one progress line (console.progress_line); returns the window's metrics. `window_steps` 0: the
  window held only the first step, with compilation: its speed is that one step's, and there is no ETA."""
  values = {k: float(v) for k, v in train_metrics.compute().items()}
  counted = window_steps or 1
  speed = {"steps_per_sec": counted / elapsed,
           "clips_per_sec": counted * config.global_batch_size / elapsed,
           "data_wait_fraction": data_wait / elapsed}
  writer.write_scalars(step, {f"train/{k}": v for k, v in {**values, **speed, **(extra or {})}.items()})
  eta = console.eta_seconds(config.num_train_steps - step, elapsed, window_steps)  # None for window_steps 0
  logging.info("%s", console.progress_line(step, config.num_train_steps, values, eta=eta, extra=extra, **speed))
  return values


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
    return _train(config, workdir, stop_signals)


def _train(config: ml_collections.ConfigDict, workdir: str, stop_signals: monitoring.StopSignals) -> TrainState:
  # Imported here, not at module level: clu's writers import TensorFlow (slow, and absent on some GPU
  # images), which the step functions above, the benches and the tests of the step do not need.
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_batch_divisible(config.global_batch_size, mesh)
  writer = console.tensorboard_writer(workdir, jax.process_index())  # no second copy of each metric line
  changed = run_config.save(config, workdir)  # <workdir>/config.json + commands.txt (process 0); readers use it
  if changed:
    logging.warning("This start changes config %s from the previous start of this run.", ", ".join(changed))
  writer.write_hparams(run_config.flat_hparams(config))  # every config leaf, dotted names

  model = build_model(config.model)
  objective = objectives.get_objective(config.objective)
  dataset = objective.make_train_dataset(config, workdir, model, process_index=jax.process_index(),
                                         process_count=jax.process_count())
  data_iterator = iter(dataset)
  describe_record = getattr(dataset, "describe_record", None)  # names records in NonFiniteLossError
  data_stream = checkpointing.DataStream(data_iterator, config.global_batch_size)  # checkpoints record the layout
  config = resolve_run_length(config, workdir)  # epoch-based runs: num_train_steps from the record count

  optimizer, schedule = make_optimizer(config)
  checkpoints = checkpointing.CheckpointWriter(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                               async_save=config.async_checkpointing, data_stream=data_stream)
  manager = checkpoints.manager
  abstract, state_shardings = abstract_state(model, optimizer, config, mesh)
  checkpointing.check_free_space(checkpoints.directory, checkpointing.state_bytes(abstract))
  restored = checkpointing.restore_latest(manager, abstract, data_stream)
  if restored is not None:
    state, start_step = restored
    logging.info("Resumed from step %d (state and data iterator).", start_step)
  else:
    state, state_shardings = create_sharded_state(model, optimizer, config, mesh)
    start_step = 0
    state = initialise_from_checkpoints(state, config, state_shardings)
  if start_step >= config.num_train_steps:
    logging.info("%s", console.already_complete(start_step, config.num_train_steps,
                                                         os.path.join(checkpoints.directory, str(start_step))))
    checkpoints.close()
    if hasattr(data_iterator, "close"):
      data_iterator.close()
    writer.close()
    return state
  param_count = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("%s", console.banner(
      objective=config.objective, model=config.model.get("name", config.objective), num_params=param_count,
      mesh=dict(mesh.shape), num_devices=mesh.size,
      records=config.data.get("train_records", "") or os.path.join(workdir, "records"),
      num_records=config.data.get("num_train_examples", 0), global_batch_size=config.global_batch_size,
      num_steps=config.num_train_steps, start_step=start_step, epochs=config.get("epochs", 0.0), workdir=workdir))
  run_start, last_values = time.perf_counter(), {}

  step_fn = make_step_fn(model, optimizer, schedule, config, mesh, state_shardings)
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer)
  train_metrics, previous = None, None
  window_start, window_steps, data_wait, skipped = time.perf_counter(), 0, 0.0, 0
  batch_timeout_s = config.data.get("batch_timeout_s", 0)
  profile = monitoring.ProfileWindow(config.get("profile_steps", ()), workdir)
  from egoexo_jax import train_eval  # pylint: disable=g-import-not-at-top  (it imports evaluate, which imports train)
  between_steps = train_eval.TrainingEvaluation(config, workdir, model, mesh, state_shardings)

  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      tick = time.perf_counter()
      batch, host = split_host_keys(monitoring.next_batch(data_iterator, batch_timeout_s, step))
      if step == start_step + 1 and jax.process_index() == 0:  # a few input clips with their targets
        from egoexo_jax import pictures  # pylint: disable=g-import-not-at-top
        pictures.write_input_clips(writer, step, batch)
        logging.info("Compiling the train step (the first step's time is left out of the speed and ETA).")
      batch = sharding.host_batch_to_global(batch, mesh)
      data_wait += time.perf_counter() - tick
      skipped += int(np.sum(host.get(pipelines.SKIPPED_RECORDS, 0)))
      profile.before_step(step)
      state, step_metrics, terms = step_fn(state, batch)
      profile.after_step(step, terms)
      # Check the previous step's loss only now, so the host never stalls the device queue.
      if previous is not None:
        check_finite(*previous)
      previous = (step, terms, host.get(pipelines.RECORD_INDEX), describe_record)
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      window_steps += 1
      report_progress(step)
      log_now = step % config.log_every_steps == 0 or step == config.num_train_steps
      if step == start_step + 1:  # the compiled step is not counted in the speed and ETA (write_summary)
        jax.block_until_ready(terms)
        logging.info("Step %d done (compilation included) in %.1f s.", step, time.perf_counter() - tick)
        window_steps = 0
        if not log_now:
          window_start, data_wait = time.perf_counter(), 0.0

      if log_now:
        check_finite(*previous)
        extra = {"skipped_records": global_sum(skipped), **monitoring.memory_metrics()}
        if hasattr(objective, "evaluate"):  # an objective's optional held-out metrics (objectives/__init__.py)
          extra.update(objective.evaluate(model, state.params, config, workdir))
        last_values = write_summary(writer, step, config, train_metrics, time.perf_counter() - window_start,
                                    window_steps, data_wait, extra)
        train_metrics, window_start, window_steps, data_wait, skipped = None, time.perf_counter(), 0, 0.0, 0

      state = between_steps(step, state)  # precise BatchNorm statistics, periodic evaluation, best checkpoint

      if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        check_finite(*previous)
        checkpoints.save(step, state)
      checkpoints.check()  # a failed async save stops the run now, not one interval later
      if stop_signals.requested(step) and step < config.num_train_steps:
        check_finite(*previous)
        checkpoints.save_now(step, state)
        raise stop_signals.stopped(step, checkpoints.directory)
  finally:
    profile.close()
    between_steps.close()
    checkpoints.close()  # an async save in flight completes even when training fails
    if hasattr(data_iterator, "close"):
      data_iterator.close()  # stops Grain worker processes
    processes.release_shared_memory()
    writer.flush()
  best, best_metric = console.read_best(between_steps.best_file)
  logging.info("%s", console.end_summary(
      final_metrics=last_values, wall_seconds=time.perf_counter() - run_start,
      steps_run=config.num_train_steps - start_step, num_steps=config.num_train_steps,
      last_checkpoint=os.path.join(checkpoints.directory, str(config.num_train_steps)),
      best_checkpoint=best, best_metric=best_metric))
  return state
