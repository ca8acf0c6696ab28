"""Precise BatchNorm statistics: the running mean and variance recomputed as exact averages over N batches.

PySlowFast (`BN.USE_PRECISE_STATS`, `BN.NUM_BATCHES_PRECISE` = 200; tools/train_net.py
`calculate_and_update_precise_bn`, which calls fvcore's `nn.precise_bn.update_bn_stats`) replaces the
exponential moving averages of every BatchNorm layer, before a checkpoint or an evaluation, by the
plain average over N training batches of the statistics of each batch: the model in train mode (batch
statistics normalise), the parameters fixed, the running mean := mean over batches of the batch means
and the running variance := mean over batches of the batch variances. The released EPIC-Kitchens
fine-tuning yamls turn it on (Ego-Exo configs/ego-exo/epic-kitchen-{55,100}/Ego_Exo_SLOWFAST_8x8_R50.yaml).

Here: the trainer's model application (train.apply_model: the objective's model in train mode on its
inputs, returning the updated `batch_stats`) is evaluated with the running statistics set to zero, so the update
m * 0 + (1 - m) * s leaves (1 - m) * s, s the batch statistic; a forward-mode derivative with respect to
the running statistics gives m for every leaf in the same pass, so s = update / (1 - m) needs no
knowledge of each layer's momentum. Leaves the train-mode pass does not update (m = 1: a frozen,
inference-mode sub-network) keep their values.

Differences from fvcore, by design: the batch statistics are those of the global batch (our BatchNorm
normalises over the whole batch across devices; PyTorch's per GPU, and fvcore averages the first
process's); the variance is the biased one Flax's BatchNorm keeps (PyTorch keeps the unbiased,
n / (n - 1) times larger, n = clips x t x h x w per GPU, so below 0.1% at R50 sizes).

The batches come from a separate stream of the objective's training pipeline seeded with
`config.seed + 1 + step` (the step at which the statistics are computed), so the training stream and a
resumed run's batches are unchanged, and the statistics of a step are the same after a resume.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from absl import logging

from egoexo_jax import sharding, train


def num_batches(config) -> int:
  """`config.precise_bn.num_batches` (0, the default, turns precise statistics off), capped like
  PySlowFast's min(NUM_BATCHES_PRECISE, len(loader)) at one epoch when data.num_train_examples is set."""
  requested = int(config.get("precise_bn", {}).get("num_batches", 0))
  if requested < 0:
    raise ValueError(f"config precise_bn.num_batches is {requested}; use 0 (off) or a positive count")
  examples = int(config.data.get("num_train_examples", 0) or 0)
  if requested and examples:
    requested = min(requested, -(-examples // config.global_batch_size))
  return requested


def make_batch_statistics_fn(objective, config, mesh, state_shardings):
  """Jitted (params, batch_stats, global batch) -> the batch's own statistics, shaped as batch_stats."""
  dropout_rng, _ = train.step_rngs(objective, jax.random.key(config.seed))

  def batch_statistics(params, batch_stats, batch):
    def updated(running):
      return train.apply_model(objective, params, running, batch, config=config, rng=dropout_rng)[1]

    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    update, momentum = jax.jvp(updated, (zeros,), (jax.tree.map(jnp.ones_like, zeros),))
    return jax.tree.map(lambda u, m, current: jnp.where(m < 1, u / (1 - m), current).astype(current.dtype),
                        update, momentum, batch_stats)

  return jax.jit(batch_statistics,
                 in_shardings=(state_shardings.params, state_shardings.batch_stats, sharding.batch_sharding(mesh)),
                 out_shardings=state_shardings.batch_stats)


def average_statistics(statistics_fn, params, batch_stats, batches):
  """fvcore's running average over `batches` (global batches): after batch i (from 0),
  average += (batch statistic - average) / (i + 1). Returns (the averages, number of batches used)."""
  average, count = None, 0
  for batch in batches:
    statistics = statistics_fn(params, batch_stats, batch)
    count += 1
    average = statistics if average is None else _running_mean(average, statistics, count)
  if average is None:
    raise ValueError("precise BatchNorm statistics: the training stream gave no batch")
  return average, count


@functools.partial(jax.jit, donate_argnums=0)
def _running_mean(average, statistics, count):
  return jax.tree.map(lambda a, s: a + (s - a) / count, average, statistics)


def training_batches(config, workdir: str, objective, mesh, step: int, count: int):
  """`count` global batches of a fresh training stream seeded by config.seed + 1 + step (module docstring)."""
  stream_config = config.copy_and_resolve_references()
  stream_config.seed = int(config.seed) + 1 + int(step)
  dataset = objective.make_dataset(stream_config, workdir, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  iterator = iter(dataset)
  try:
    for _ in range(count):
      batch, _ = train.split_host_keys(next(iterator))
      yield sharding.host_batch_to_global(batch, mesh)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()  # stops Grain worker processes


class PreciseBatchNorm:
  """Recomputes a TrainState's batch_stats (module docstring); built once per run, so the statistics
  function compiles once. Does nothing when config.precise_bn.num_batches is 0 or the model has no
  BatchNorm."""

  def __init__(self, config, workdir: str, objective, mesh, state_shardings):
    self.config, self.workdir, self.objective, self.mesh = config, workdir, objective, mesh
    self.num_batches = num_batches(config)
    self.statistics_fn = (make_batch_statistics_fn(objective, config, mesh, state_shardings) if self.num_batches
                          else None)

  def __call__(self, state, step: int):
    if not self.num_batches or not jax.tree.leaves(state.batch_stats):
      return state
    start = time.perf_counter()
    batches = training_batches(self.config, self.workdir, self.objective, self.mesh, step, self.num_batches)
    batch_stats, count = average_statistics(self.statistics_fn, state.params, state.batch_stats, batches)
    logging.info("Step %d: precise BatchNorm statistics from %d training batches (%.1f s).", step, count,
                 time.perf_counter() - start)
    return state.replace(batch_stats=batch_stats)

