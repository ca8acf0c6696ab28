"""PySlowFast's learning-rate policies (slowfast/utils/lr_policy.py), in epochs or in steps.

`optimizer.lr_policy`:
  'cosine': lr(e) = peak (1 + cos(pi e / E)) / 2 over all E epochs; for e < W (warm-up epochs) it is
      instead the line from start = warmup_start_fraction x peak at e = 0 to the cosine's value at e = W,
      so the warm-up ends on the curve (not at the peak).
  'steps_with_relative_lrs': lr(e) = peak x lrs[i] for lr_steps[i] <= e < lr_steps[i + 1] (lr_steps[0] = 0),
      with the same warm-up: a line from the start value to the policy's value at e = W.
The progress e of step s (0-based: the rate of the update that step s makes) is s / steps_per_epoch, as
PySlowFast's cur_epoch + cur_iter / iters_per_epoch, when the run is epoch-based (config.epochs > 0):
steps_per_epoch = records / global batch and num_train_steps = ceil(epochs x steps_per_epoch). With
config.epochs = 0 the same formulas run in steps: E = num_train_steps, W = optimizer.warmup_steps.

The peak is optimizer.base_learning_rate scaled linearly by global_batch_size / reference_batch_size.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax.numpy as jnp
import ml_collections
from absl import logging

POLICIES = ("cosine", "steps_with_relative_lrs")


class RecordCountUnknown(ValueError):
  """An epoch-based run whose number of training records is not known yet (see train.resolve_run_length)."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run's length: in epochs (epoch-based) or steps, and how many steps an epoch is."""

  num_train_steps: int
  steps_per_epoch: float  # 1.0 when the policy counts steps
  total: float  # E: epochs (or steps)
  warmup: float  # W: warm-up epochs (or steps)
  num_records: int  # 0 when the run is counted in steps

  def describe(self, config) -> str:
    opt = config.optimizer
    unit = "epochs" if self.num_records else "steps"
    shape = (f"lr_steps {tuple(opt.lr_steps)} x lrs {tuple(opt.lrs)}" if opt.lr_policy == "steps_with_relative_lrs"
             else "cosine over all of them")
    length = (f"{self.total:g} epochs x {self.steps_per_epoch:.2f} steps/epoch ({self.num_records} records / "
              f"global batch {config.global_batch_size}) = {self.num_train_steps} steps" if self.num_records
              else f"{self.num_train_steps} steps")
    return (f"LR policy '{opt.lr_policy}' (PySlowFast): {length}; peak {peak_learning_rate(config):.4g}, "
            f"{shape}; warm-up {self.warmup:g} {unit} from {opt.warmup_start_fraction:g} x peak onto the curve")


def peak_learning_rate(config) -> float:
  opt = config.optimizer
  reference = opt.get("reference_batch_size", 64)
  return opt.base_learning_rate * (config.global_batch_size / reference if reference else 1.0)


def is_epoch_based(config) -> bool:
  return bool(config.optimizer.get("lr_policy", "")) and config.get("epochs", 0) > 0


def steps_for_epochs(epochs: float, num_records: int, global_batch_size: int) -> int:
  """ceil(epochs x records / global batch): how many steps `epochs` epochs are (the run length, the periodic
  evaluation's period); the 1e-9 keeps a product that is a whole number in exact arithmetic from rounding up."""
  return int(math.ceil(epochs * num_records / global_batch_size - 1e-9))


def epoch_records(config, num_records: int = 0) -> int:
  """Training records per epoch: data.num_train_examples when set, else `num_records` (counted at start by
  train.resolve_run_length); 0 when neither is known."""
  return int(config.data.get("num_train_examples", 0) or num_records or 0)


def plan(config, num_records: int = 0) -> Plan:
  """The run's length. Epoch-based runs need `num_records` (or data.num_train_examples, which wins)."""
  opt = config.optimizer
  if opt.lr_policy not in POLICIES:
    raise ValueError(f"unknown config optimizer.lr_policy '{opt.lr_policy}': use one of {POLICIES} or ''")
  if not is_epoch_based(config):
    steps = int(config.num_train_steps)
    if not 0 <= opt.warmup_steps < steps:
      raise ValueError(f"config optimizer.warmup_steps ({opt.warmup_steps}) must be in [0, num_train_steps) "
                       f"(num_train_steps is {steps})")
    return Plan(steps, 1.0, float(steps), float(opt.warmup_steps), 0)
  num_records = epoch_records(config, num_records)
  if num_records <= 0:
    raise RecordCountUnknown(f"config epochs is {config.epochs} but the number of training records is unknown: set "
                     "config.data.num_train_examples or point data.train_records at non-empty shards")
  steps_per_epoch = num_records / config.global_batch_size
  if not 0 <= opt.warmup_epochs < config.epochs:
    raise ValueError(f"config optimizer.warmup_epochs ({opt.warmup_epochs}) must be in [0, epochs) "
                     f"(epochs is {config.epochs})")
  steps = steps_for_epochs(config.epochs, num_records, config.global_batch_size)
  return Plan(steps, steps_per_epoch, float(config.epochs), float(opt.warmup_epochs), num_records)


def resolve(config: ml_collections.ConfigDict, num_records: int = 0) -> tuple[ml_collections.ConfigDict, Plan]:
  """A copy of `config` whose num_train_steps is the plan's (epoch-based runs), and the plan."""
  the_plan = plan(config, num_records)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.num_train_steps = the_plan.num_train_steps
    if the_plan.num_records:
      config.data.num_train_examples = the_plan.num_records
  return config, the_plan


def unresolved_schedule(error: RecordCountUnknown):
  """A schedule for code that only needs the optimiser's structure (restoring a checkpoint to evaluate): it
  raises `error` if a learning rate is ever asked for."""
  def schedule(step):
    raise error
  return schedule


def make_schedule(config, the_plan: Plan):
  """optax-style schedule: step -> learning rate, PySlowFast's policy at epoch step / steps_per_epoch."""
  opt = config.optimizer
  peak, total, warmup = peak_learning_rate(config), the_plan.total, the_plan.warmup
  start = opt.warmup_start_fraction * peak
  if opt.lr_policy == "cosine":
    policy = lambda e: peak * 0.5 * (jnp.cos(jnp.pi * e / total) + 1.0)
  else:
    lr_steps, lrs = [float(s) for s in opt.lr_steps], [float(r) for r in opt.lrs]
    if not lr_steps or lr_steps[0] != 0 or len(lrs) != len(lr_steps) or lr_steps != sorted(lr_steps):
      raise ValueError(f"config optimizer.lr_steps {tuple(opt.lr_steps)} must start at 0 and increase, one per "
                       f"optimizer.lrs {tuple(opt.lrs)}")
    bounds, values = jnp.asarray(lr_steps[1:]), jnp.asarray(lrs)
    policy = lambda e: peak * values[jnp.sum(e >= bounds)]
  end_of_warmup = policy(jnp.float32(warmup))

  def schedule(step):
    epoch = jnp.asarray(step, jnp.float32) / the_plan.steps_per_epoch
    warm = start + (end_of_warmup - start) * epoch / max(warmup, 1e-12)
    return jnp.where(epoch < warmup, warm, policy(epoch))

  return schedule


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
  if ((policy and is_epoch_based(config)) or eval_in_epochs) and not epoch_records(config):
    pattern = config.data.train_records or os.path.join(workdir, "records", "train.tfrecord-*")
    from egoexo_jax.input import sources  # pylint: disable=g-import-not-at-top  (configs import this module)
    num_records = len(sources.open_records(pattern))
  if policy:
    config, plan = resolve(config, num_records)
    logging.info("%s", plan.describe(config))
  if num_records and not epoch_records(config):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.num_train_examples = num_records
    logging.info("Counted %d training records per epoch (data.num_train_examples was 0).", num_records)
  return config
