"""The compact training loop of the downstream models: Adam, epochs, validation, best checkpoint, JSON.

These are small models trained on fixed features, not video pre-training, so they do not go through
egoexo_jax/train.py: one jitted Adam step, a validation pass after every epoch, and the parameters of
the best epoch (by `selection_metric`, higher is better) written to `<output_dir>/best.msgpack`
(flax.serialization bytes, written whole or not at all). The caller scores the test set with the
parameters this returns: the best epoch's, read back from that file.

Weight decay is PyTorch Adam's (an L2 term added to the gradient, as the released C2F-TCN trains);
the learning rate is multiplied by `lr_decay_factor` at each epoch of `lr_decay_epochs` (PyTorch's
StepLR, as TempAgg's release: x0.1 after epoch 10). Models with BatchNorm pass `model_state` (the
'batch_stats'), which the loss returns updated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from egoexo_jax import atomic_files

BEST_CHECKPOINT = "best.msgpack"


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  epochs: int = 50
  learning_rate: float = 5e-4
  weight_decay: float = 0.0
  seed: int = 0
  lr_decay_epochs: tuple[int, ...] = ()  # the learning rate is multiplied by lr_decay_factor after these epochs
  lr_decay_factor: float = 0.1


def write_json(path: str, content: Any) -> None:
  with atomic_files.atomic_write(path, "w") as f:
    json.dump(content, f, indent=1)
    f.write("\n")


def write_results(output_dir: str, results: dict[str, Any], history: list[dict], test_scores: dict[str, float]
                  ) -> dict[str, Any]:
  """Adds the best epoch, the history and the test scores to `results`, writes <output_dir>/results.json
  and logs the test scores; returns the completed results."""
  results = {**results, "best_epoch": max((h for h in history if h.get("best")), key=lambda h: h["epoch"])["epoch"],
             "history": history, "test": test_scores}
  write_json(os.path.join(output_dir, "results.json"), results)
  logging.info("test: %s", "  ".join(f"{k} {v:.2f}" for k, v in test_scores.items()))
  return results


def define_data_flags() -> None:
  """The flags both downstream CLIs share, the first four required: features, annotations, split, output
  folder, and the views to train and test on."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("features_dir", None, "Required. Folder of <recording>/<view>.npy per-frame features.")
  flags.DEFINE_string("segments", None, "Required. Segments CSV: recording,start_frame,end_frame,action,verb,object.")
  flags.DEFINE_string("split", None, "Required. Split CSV: recording,split (train/val/test).")
  flags.DEFINE_string("output_dir", None, "Required. Where best.msgpack and results.json go.")
  flags.DEFINE_list("train_views", [], "Views to train and validate on (default: all).")
  flags.DEFINE_list("test_views", [], "Views to test on (default: the train views); a held-out view = novel view.")
  flags.mark_flags_as_required(["features_dir", "segments", "split", "output_dir"])


def fit(params: Any, loss_fn: Callable[[Any, dict, jax.Array], jax.Array],
        epoch_batches: Callable[[int], Iterable[dict]], evaluate: Callable[[Any], dict[str, float]],
        selection_metric: str, settings: LoopSettings, output_dir: str, *, model_state: Any = None
        ) -> tuple[Any, list[dict]]:
  """Trains `params` for `settings.epochs` epochs; returns (the best epoch's parameters, history).

  loss_fn(params, batch, rng) -> scalar; epoch_batches(epoch) -> that epoch's batches (dicts of
  arrays, shuffled by the caller); evaluate(params) -> validation metrics holding `selection_metric`.
  history: one dict per epoch (epoch, train_loss, seconds, validation metrics).
  With `model_state` (e.g. BatchNorm statistics): loss_fn(params, model_state, batch, rng) -> (loss, new
  model_state), evaluate((params, model_state)), and the best epoch's (params, model_state) is returned.
  """
  def make_optimizer(learning_rate):
    adam = optax.adam(learning_rate)
    return optax.chain(optax.add_decayed_weights(settings.weight_decay), adam) if settings.weight_decay else adam

  optimizer = optax.inject_hyperparams(make_optimizer)(learning_rate=settings.learning_rate)
  opt_state = optimizer.init(params)
  stateful = model_state is not None

  @jax.jit
  def step(params, model_state, opt_state, batch, rng):
    if stateful:
      (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, batch, rng)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), model_state, opt_state, loss

  os.makedirs(output_dir, exist_ok=True)
  best_path = os.path.join(output_dir, BEST_CHECKPOINT)
  rng = jax.random.key(settings.seed)
  history, best = [], -np.inf
  for epoch in range(1, settings.epochs + 1):
    start, epoch_losses = time.perf_counter(), []
    decays = sum(epoch > e for e in settings.lr_decay_epochs)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(
        settings.learning_rate * settings.lr_decay_factor**decays, jnp.float32)
    for batch in epoch_batches(epoch):
      rng, step_rng = jax.random.split(rng)
      params, model_state, opt_state, loss = step(params, model_state, opt_state, batch, step_rng)
      epoch_losses.append(loss)
    if not epoch_losses:
      raise ValueError("an epoch produced no batches: the training set is empty")
    train_loss = float(np.mean(jax.device_get(epoch_losses)))
    if not np.isfinite(train_loss):
      raise FloatingPointError(f"non-finite training loss at epoch {epoch}; the best checkpoint is kept")
    validation = evaluate((params, model_state) if stateful else params)
    if selection_metric not in validation:
      raise KeyError(f"selection metric '{selection_metric}' not among the validation metrics {sorted(validation)}")
    record = {"epoch": epoch, "train_loss": train_loss, "seconds": time.perf_counter() - start, **validation}
    if validation[selection_metric] > best:
      best = validation[selection_metric]
      with atomic_files.atomic_write(best_path) as f:
        f.write(flax.serialization.to_bytes((params, model_state) if stateful else params))
      record["best"] = True
    history.append(record)
    logging.info("epoch %d/%d  train loss %.4f  %s", epoch, settings.epochs, train_loss,
                 "  ".join(f"{k} {v:.2f}" for k, v in validation.items()))
  with open(best_path, "rb") as f:
    return flax.serialization.from_bytes((params, model_state) if stateful else params, f.read()), history
