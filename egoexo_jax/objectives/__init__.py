"""Training objectives: what differs per method, as one narrow `Objective` the trainer resolves once.

`resolve(config)` looks `config.objective` up in OBJECTIVES (a plain dict of builders below, so "go to
definition" leads from the trainer to each method's loss) and returns an Objective:

  name            config.objective
  model           the method's flax module, built from config.model (each objective knows its network)
  make_dataset(config, workdir, *, process_index, process_count) -> grain IterDataset
                  this host's stream of batches (dicts of NumPy arrays, leading axis the per-host batch),
                  checkpointable (Grain's get_state/set_state). `config` is a parameter, not the one the
                  objective was built from, so precise BatchNorm can draw a stream with another seed.
  example_batch(config, batch_size) -> {key: jax.ShapeDtypeStruct}
                  the batch's shapes and dtypes; the trainer initialises the model on `model_inputs` of it.
  model_inputs(batch) -> tuple
                  the positional inputs of `model.apply` (None for an absent input, e.g. SUM-L's exo clips in
                  FPV-only runs). uint8 inputs are video clips: the TRAINER normalises them
                  (transforms.normalize_clips, to config.model.dtype), applies the model in train mode with
                  the 'dropout' rng and takes the updated BatchNorm statistics (train.apply_model).
  loss(outputs, batch, *, config, rng, mesh) -> (total, scalars)
                  a plain function of the model's outputs and the global batch: the scalar to minimise and a
                  dict of float32 scalars to average and log ('loss' among them). `batch` holds global
                  jax.Arrays sharded over the mesh's batch axes (`sharding.BATCH_AXES`, data x fsdp); a loss
                  that needs explicit collectives (per-device negatives, ring passes) uses jax.shard_map over
                  `mesh` with those axes on the outputs, so one model application serves every method.
  evaluate(params, config, workdir) -> {name: float}     (optional, None when absent)
                  held-out metrics, computed at every log step and logged with the step's scalars.
  split_rng       whether the step's key is split into (dropout key, loss key) (SUM-L, whose loss draws
                  triplet negatives) or used as both (the others); kept per objective so that every method's
                  random streams, hence its losses, are those of the runs recorded in the configs.

Objectives: egoexo (Ego-Exo pre-training and view classification), suml (SUM-L stages (a) and (b) and
its baselines), evgap (EVGAP pair and group stages), finetune (Charades-Ego / EPIC-Kitchens, Ego-Exo*).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  model: nn.Module
  make_dataset: Callable[..., Any]
  example_batch: Callable[[Any, int], dict]
  model_inputs: Callable[[dict], tuple]
  loss: Callable[..., tuple]
  evaluate: Callable[..., dict] | None = None
  split_rng: bool = False


def resolve(config) -> Objective:
  """The Objective of `config.objective` (module docstring), built once per run from `config`."""
  name = config.objective
  if name not in OBJECTIVES:
    raise ValueError(f"unknown config objective '{name}': use one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name](config)


# The registry imports the objective modules, which import Objective above.
from egoexo_jax.objectives import egoexo, evgap, finetune, suml  # pylint: disable=wrong-import-position

OBJECTIVES: dict[str, Callable[[Any], Objective]] = {
    "egoexo": egoexo.objective,
    "evgap": evgap.objective,
    "finetune": finetune.objective,
    "suml": suml.objective,
}
