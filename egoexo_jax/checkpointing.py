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


def latest_step_dir(path: str) -> str:
  """A step folder from a workdir, its `checkpoints` folder, or a step folder itself (newest step)."""
  path = os.path.abspath(path)
  for candidate in (os.path.join(path, "checkpoints"), path):
    steps = [d for d in os.listdir(candidate) if d.isdigit()] if os.path.isdir(candidate) else []
    if steps:
      return os.path.join(candidate, max(steps, key=int))
  if os.path.isdir(os.path.join(path, STATE)):
    return path
  raise FileNotFoundError(f"no checkpoint under '{path}' (expected a workdir, its checkpoints/ folder, "
                          "or a step folder holding 'state/')")


def load_backbone(path: str, params: Any, batch_stats: Any, subtree: str = "backbone",
                  source_subtree: str | None = None) -> tuple[Any, Any]:
  """Replaces the `subtree` of params and batch_stats with the checkpoint's `source_subtree`
  (default: the same name) of the checkpoint at `path`.

  Heads stay as initialised (a new task's heads). Every array of the subtree must be present with
  the same shape; the error names the first one that is not.
  """
  source_subtree = source_subtree or subtree
  step_dir = latest_step_dir(path)
  saved = ocp.StandardCheckpointer().restore(os.path.join(step_dir, STATE))
  out = []
  for collection, current in (("params", params), ("batch_stats", batch_stats)):
    if subtree not in current:
      out.append(current)
      continue
    source = saved.get(collection, {}).get(source_subtree)
    if source is None:
      raise KeyError(f"{step_dir}: the checkpoint has no '{collection}/{source_subtree}'")
    flat_source = dict(jax.tree_util.tree_flatten_with_path(source)[0])
    replaced = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(current[subtree])[0]:
      name = f"{collection}/{source_subtree}{jax.tree_util.keystr(key_path)}"
      if key_path not in flat_source:
        raise KeyError(f"{step_dir}: the checkpoint has no '{name}'")
      if flat_source[key_path].shape != value.shape:
        raise ValueError(f"{step_dir}: '{name}' has shape {flat_source[key_path].shape} in the checkpoint but "
                         f"{value.shape} in this model")
      replaced[key_path] = jax.numpy.asarray(flat_source[key_path], value.dtype)
    treedef = jax.tree_util.tree_structure(current[subtree])
    leaves = [replaced[k] for k, _ in jax.tree_util.tree_flatten_with_path(current[subtree])[0]]
    out.append({**current, subtree: jax.tree_util.tree_unflatten(treedef, leaves)})
  return out[0], out[1]
