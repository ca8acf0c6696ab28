"""Orbax checkpoints of the train state together with the Grain data iterator.

Each checkpoint is one step folder holding two items: `state` (the TrainState pytree) and
`data_iterator` (Grain's iterator state, one file per host). Orbax writes a step into a
temporary folder and renames it when every item is complete, so an interrupted save never
becomes the "latest" checkpoint; a resumed run restores both items and continues with the
exact batches the interrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA_ITERATOR = "data_iterator"


def make_manager(workdir: str, *, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints` keeping the newest `max_to_keep` steps."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")  # Orbax needs absolute paths
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


@dataclasses.dataclass(frozen=True)
class _IteratorSnapshot:
  """An iterator position frozen at save time, in the form Grain's handler writes (JSON bytes).

  Grain's handler asks the iterator for its state when Orbax runs the handler, which with async
  saves can be after training has drawn more batches; the snapshot pins the saved position to
  the step being saved.
  """

  state: bytes

  def get_state(self) -> bytes:
    return self.state


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None = None) -> None:
  """Starts saving `state` (and the iterator's position) as step `step`; returns before the write ends."""
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    snapshot = _IteratorSnapshot(json.dumps(data_iterator.get_state(), indent=1).encode())
    items[DATA_ITERATOR] = grain.checkpoint.CheckpointSave(snapshot)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iterator: Any | None = None) -> tuple[Any, int] | None:
  """Restores the newest checkpoint into the shardings of `abstract_state`; None if there is none.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (from jax.eval_shape), so
  arrays come back already placed on the current mesh. When `data_iterator` is given, its
  position is restored in place.
  """
  step = manager.latest_step()
  if step is None:
    return None
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA_ITERATOR] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], step


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a pytree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
