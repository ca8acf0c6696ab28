"""What the training loop does between steps besides checkpointing: precise BatchNorm statistics and
periodic evaluation, keeping the best checkpoint.

PySlowFast's loop (tools/train_net.py; Ego-Exo's tools/epic/train_net.py) after each epoch: precise BN
statistics when they are on (before a checkpoint or an evaluation), then an evaluation every
`TRAIN.EVAL_PERIOD` epochs (2 in the released fine-tuning yamls) and after the last, keeping the best
epoch (Ego-Exo: `is_best_epoch`, highest mAP for Charades-Ego, lowest action top-1 error for EPIC).

Here (`TrainingEvaluation`, called once per step by train.py):
  - precise BN statistics (egoexo_jax/precise_bn.py) at every evaluation step and at the last step,
    so the final checkpoint, which export and `egoexo_jax.evaluate` read, holds them;
  - evaluation every `train_eval.every_steps` steps (or, when that is 0, every `train_eval.every_epochs`
    epochs of data.num_train_examples records, counted at start when 0: train.resolve_run_length) and at
    the last step, on `data.eval_records` with
    `egoexo_jax.evaluate`'s forward and metrics (`evaluate.score_records`; `config.eval`'s views,
    except `train_eval.num_clips` x `train_eval.num_crops`: 1 x 1 by default, PySlowFast's 'val' mode
    view count); scalars 'eval/<metric>' in <workdir>/eval;
  - the best state by `train_eval.best_metric` (higher is better; '' picks mAP for multi-label,
    action_top1 with verb and noun heads, else <first head>_top1) saved as a full checkpoint in
    <workdir>/best (one kept, next to `best.json`: step, metric, value, all metrics), which
    `python -m egoexo_jax.evaluate --checkpoint=best` reads. <workdir>/checkpoints keeps its newest-N
    for resuming; a resumed run reads best.json and replaces the best only by a better one.
Periodic evaluation runs on one process (multi-host runs: evaluate afterwards with the CLI).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import ml_collections
from absl import logging

from egoexo_jax import atomic_files, checkpointing, evaluate, lr_policy
from egoexo_jax.input import finetune_pipeline
from egoexo_jax.precise_bn import PreciseBatchNorm

BEST = "best"


def eval_every_steps(config) -> int:
  """Steps between evaluations: train_eval.every_steps, else every_epochs in steps as the LR policy counts
  them (lr_policy.steps_for_epochs over data.num_train_examples, which train.resolve_run_length fills in
  from the record count at start when it is 0)."""
  settings = config.get("train_eval", ml_collections.ConfigDict())
  steps = int(settings.get("every_steps", 0))
  epochs = float(settings.get("every_epochs", 0.0))
  if steps < 0 or epochs < 0:
    raise ValueError(f"config train_eval.every_steps ({steps}) and every_epochs ({epochs}) must be >= 0")
  if steps or not epochs:
    return steps
  records = lr_policy.epoch_records(config)
  if not records:
    raise ValueError(f"config train_eval.every_epochs is {epochs} but data.num_train_examples is not set and the "
                     "training records were not counted: set it (records per epoch) or train_eval.every_steps")
  return max(1, lr_policy.steps_for_epochs(epochs, records, config.global_batch_size))


def best_metric_name(config) -> str:
  """train_eval.best_metric, or the dataset's headline metric when it is ''."""
  name = config.get("train_eval", {}).get("best_metric", "")
  if name:
    return name
  if config.data.get("label_kind", "single") == "multi_label":
    return "mAP"
  heads = [h for h, _ in finetune_pipeline.head_sizes(config)]
  return "action_top1" if {"verb", "noun"} <= set(heads) else f"{heads[0]}_top1"


class TrainingEvaluation:
  """Precise BN and periodic evaluation for one run (module docstring). `__call__(step, state)` returns
  the state, with recomputed batch_stats at evaluation steps and the last step when precise BN is on."""

  def __init__(self, config, workdir: str, objective, mesh, state_shardings):
    self.config, self.workdir, self.model, self.mesh = config, os.path.abspath(workdir), objective.model, mesh
    self.precise_bn = PreciseBatchNorm(config, workdir, objective, mesh, state_shardings)
    self.records = config.data.get("eval_records", "")
    asked = config.get("train_eval", {})
    if not self.records and (asked.get("every_steps", 0) or asked.get("every_epochs", 0)):
      logging.warning("Periodic evaluation is off: config train_eval asks for it, but data.eval_records is empty.")
    self.every = eval_every_steps(config) if self.records else 0
    if self.every and jax.process_count() > 1:
      raise ValueError("periodic evaluation runs on one process: set train_eval.every_steps=0 and "
                       "train_eval.every_epochs=0, and evaluate with python -m egoexo_jax.evaluate")
    self.metric = best_metric_name(config) if self.every else ""
    self.best_file = os.path.join(self.workdir, BEST, "best.json")
    self.best_value = -math.inf
    if self.every and os.path.exists(self.best_file):
      with open(self.best_file) as f:
        self.best_value = float(json.load(f)["value"])
    self.writer = None

  def __call__(self, step: int, state):
    last = step == self.config.num_train_steps
    evaluate_now = bool(self.every) and (step % self.every == 0 or last)
    if evaluate_now or last:
      state = self.precise_bn(state, step)
    if evaluate_now:
      self.evaluate(step, state)
    return state

  def evaluate(self, step: int, state) -> dict:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    settings = evaluate.eval_settings(self.config)
    given = self.config.get("train_eval", ml_collections.ConfigDict())
    settings.num_clips, settings.num_crops = int(given.get("num_clips", 1)), int(given.get("num_crops", 1))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    metrics = evaluate.score_records(self.config, self.model, variables, self.mesh, self.records, settings)["metrics"]
    if self.metric not in metrics:
      raise ValueError(f"config train_eval.best_metric '{self.metric}' is not among the metrics {sorted(metrics)}")
    if self.writer is None:
      self.writer = metric_writers.create_default_writer(self.workdir, collection="eval")
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    self.writer.flush()
    value = float(metrics[self.metric])
    improved = value > self.best_value
    if improved:
      self.save_best(step, state, value, metrics)
    logging.info("Step %d: eval %s (%s %.4f, best %.4f%s; %.1f s)", step,
                 "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())), self.metric, value, self.best_value,
                 ", saved to best/" if improved else "", time.perf_counter() - start)
    return metrics

  def save_best(self, step: int, state, value: float, metrics: dict) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    directory = os.path.join(self.workdir, BEST)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options) as manager:
      checkpointing.save(manager, step, state)
      manager.wait_until_finished()
    with atomic_files.atomic_write(self.best_file, "w") as f:
      json.dump({"step": int(step), "metric": self.metric, "value": value, "metrics": metrics}, f, indent=2)
    self.best_value = value

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
