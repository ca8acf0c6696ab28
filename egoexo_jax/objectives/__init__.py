"""Training objectives, chosen by `config.objective` (a module name in this package).

The trainer (egoexo_jax/train.py) is the same for every method; an objective module supplies the
parts that differ, as plain functions:

  make_train_dataset(config, workdir, model, *, process_index, process_count) -> grain IterDataset
      this host's stream of batches (dicts of NumPy arrays, leading axis the per-host batch),
      checkpointable (Grain's get_state/set_state);
  init_variables(model, config, rng) -> {'params': ..., 'batch_stats': ...}
      the model's variables, from example inputs of the configured shapes;
  loss(model, params, batch_stats, batch, *, config, rng, mesh) -> (total, (terms, new_batch_stats))
      the scalar to minimise on the global batch, a dict of float32 scalars to average and log
      ('loss' among them; losses per term, accuracies), and the updated BatchNorm statistics.
      `batch` holds global jax.Arrays sharded over the mesh's batch axes (`sharding.BATCH_AXES`,
      data x fsdp); a loss that needs explicit collectives (per-device negatives, ring passes)
      uses jax.shard_map over `mesh` with those axes.
  evaluate(model, params, config, workdir) -> {name: float}     (optional)
      held-out metrics, computed at every log step and logged with the step's scalars.

Objectives: egoexo (Ego-Exo pre-training and view classification), suml (SUM-L stages (a) and (b)
and its baselines), evgap (EVGAP steps 1 and 2), finetune (Charades-Ego / EPIC-Kitchens, Ego-Exo*).
"""

from __future__ import annotations

import importlib
import types


def get_objective(name: str) -> types.ModuleType:
  """The objective module `name` (config.objective)."""
  try:
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise ValueError(f"unknown objective '{name}' (config.objective): no module egoexo_jax/objectives/{name}.py") from e
