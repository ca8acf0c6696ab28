"""Orbax checkpoints of the train state together with the Grain data iterator.

One module over 400 lines on purpose: everything a bit-exact resume depends on (state, data iterator, layout,
the writer and its failure handling, free space) in one place.

Each checkpoint is one step folder holding three items: `state` (the TrainState pytree),
`data_iterator` (Grain's iterator state, one file per process) and `data_layout` (the process count
and global batch size the iterator state belongs to). Orbax writes a step into a temporary folder and
renames it when every item is complete (asynchronously by default: `save` returns while the write
goes on), so a save interrupted at any moment, even by SIGKILL, never becomes the "latest" checkpoint
(tested by killing a process mid-write); a resumed run restores the items and continues with the
exact batches the interrupted run would have drawn.

Topology changes. The state restores onto any mesh: arrays come back in the shardings of the
abstract state of the new run (e.g. written fully sharded over 8 devices, read on 1). The data
position restores as follows:
- same process count and data.num_workers: Grain's own per-process state (any pipeline);
- a different process count or worker count: the position is rebuilt from the number of batches each
  process had drawn. This is exact for pipelines whose global stream does not depend on the topology,
  which every pipeline built on `stream.batched_stream` (and the EVGAP feature pipeline) is: global
  batch k is the same examples for any number of hosts or workers. It needs the same
  global_batch_size, and Grain iterator states of the two shapes Grain 0.2 writes (a plain
  MapDataset iterator, or mp_prefetch's interleave of worker iterators); anything else is a
  `DataPositionError` saying what to keep unchanged, never a silently different data order.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
DATA_ITERATOR = "data_iterator"
DATA_LAYOUT = "data_layout"


class DataPositionError(ValueError):
  """The checkpoint's data position cannot be carried over to this run's process or worker count."""


def make_manager(workdir: str, *, max_to_keep: int, async_save: bool = True,
                 cleanup_tmp: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints` keeping the newest `max_to_keep` steps.

  `cleanup_tmp`: delete the temporary folders of saves that never finished (a killed run's); only for
  the one writer of the workdir (the trainer, under its run_lock), never for a reader beside it.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")  # Orbax needs absolute paths
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save, cleanup_tmp_directories=cleanup_tmp)
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


@dataclasses.dataclass(frozen=True)
class DataStream:
  """A Grain iterator together with the global batch size it feeds; checkpoints of a DataStream
  record the data layout, so a run with another process or worker count can resume its position."""

  iterator: Any
  global_batch_size: int


def _iterator_and_batch(data_iterator: Any) -> tuple[Any, int | None]:
  if isinstance(data_iterator, DataStream):
    return data_iterator.iterator, data_iterator.global_batch_size
  return data_iterator, None


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None = None) -> None:
  """Starts saving `state` (and the iterator's position) as step `step`; returns before the write ends.

  `data_iterator`: a Grain iterator, or a DataStream (which also records the data layout).
  """
  items = {STATE: ocp.args.StandardSave(state)}
  iterator, global_batch_size = _iterator_and_batch(data_iterator)
  if iterator is not None:
    snapshot = _IteratorSnapshot(json.dumps(iterator.get_state(), indent=1).encode())
    items[DATA_ITERATOR] = grain.checkpoint.CheckpointSave(snapshot)
    if global_batch_size is not None:
      items[DATA_LAYOUT] = ocp.args.JsonSave({"process_count": jax.process_count(),
                                              "global_batch_size": int(global_batch_size)})
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iterator: Any | None = None) -> tuple[Any, int] | None:
  """Restores the newest checkpoint into the shardings of `abstract_state`; None if there is none.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (from jax.eval_shape), so
  arrays come back already placed on the current mesh, whatever mesh wrote them. When
  `data_iterator` (a Grain iterator or a DataStream) is given, its position is restored in place: by
  Grain when the process and worker counts are those of the checkpoint, else rebuilt from the batches
  drawn (module docstring; needs a DataStream, for the global batch size).
  """
  data_iterator, global_batch_size = _iterator_and_batch(data_iterator)
  step = manager.latest_step()
  if step is None:
    return None
  step_dir = os.path.join(str(manager.directory), str(step))
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  move_data = False
  if data_iterator is not None:
    fresh = data_iterator.get_state()
    saved = _saved_iterator_states(step_dir)
    move_data = len(saved) != jax.process_count() or _worker_count(saved[0]) != _worker_count(fresh)
    if not move_data:
      items[DATA_ITERATOR] = grain.checkpoint.CheckpointRestore(data_iterator)
  check_saved_shapes(manager, step, abstract_state)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if move_data:
    _move_data_position(step_dir, saved, data_iterator, fresh, global_batch_size)
  return restored[STATE], step


# --------------------------------------------------------------------------- the trainer's writer: disks fill up


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (full disk, lost storage); the message is one line."""


class DiskSpaceError(OSError):
  """Not enough free space for one checkpoint; the message is one line."""


def state_bytes(abstract_state: Any) -> int:
  """Bytes of one checkpoint's arrays (all hosts' shards together), from the abstract state."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)))


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


def free_bytes(directory: str) -> int:
  """Free bytes on the disk holding `directory` (or its nearest existing parent)."""
  path = os.path.abspath(directory)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def check_free_space(directory: str, needed: int) -> None:
  """Raises DiskSpaceError when the disk of `directory` has less than `needed` bytes (plus 1 MiB of
  metadata) free: a run that could not write its first checkpoint should not start."""
  free = free_bytes(directory)
  if free < needed + 2**20:
    raise DiskSpaceError(f"not enough free space for one checkpoint in {directory}: the train state needs about "
                         f"{_mib(needed)}, the disk has {_mib(free)} free; free some space or use another workdir")


def remove_unfinished(directory: str) -> list[str]:
  """Deletes the temporary folders of saves that did not finish (`<step>.orbax-checkpoint-tmp*`)."""
  removed = sorted(glob.glob(os.path.join(glob.escape(directory), "*.orbax-checkpoint-tmp*")))
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
  return removed


class CheckpointWriter:
  """The trainer's checkpoints: `save` starts a (by default async) save of the state and the data
  position; `check` after every step turns a save that failed into CheckpointSaveError at once (one
  line naming the folder, the cause and the free space), after deleting its temporary folder, so the
  last good checkpoint stays the newest; `save_now` saves and waits (a stop signal's checkpoint).

  Only process 0 deletes temporary folders (the workdir is shared by all hosts).
  """

  def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool, data_stream: Any = None):
    self.manager = make_manager(workdir, max_to_keep=max_to_keep, async_save=async_save, cleanup_tmp=True)
    self.directory = str(self.manager.directory)
    self.data_stream = data_stream
    self.last_good = self.manager.latest_step()
    self.pending = None  # the step being written
    self.failed = False

  def _failed(self, step: int, error: BaseException) -> CheckpointSaveError:
    self.failed, self.pending = True, None
    if jax.process_index() == 0:
      remove_unfinished(self.directory)
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    kept = f"the last good checkpoint, step {self.last_good}, is kept" if self.last_good is not None else \
        "no earlier checkpoint exists"
    return CheckpointSaveError(f"checkpoint of step {step} could not be written to {self.directory}: {cause[:400]}; "
                               f"{_mib(free_bytes(self.directory))} free there; {kept}; stopping")

  def save(self, step: int, state: Any) -> None:
    self.check(wait=True)  # one save in flight at a time; an earlier failure stops here
    try:
      save(self.manager, step, state, self.data_stream)
    except (OSError, ValueError) as e:  # a synchronous save, or one refused at once
      raise self._failed(step, e) from None
    self.pending = step

  def check(self, wait: bool = False) -> None:
    """Raises CheckpointSaveError if the save in flight failed (waiting for it when `wait`)."""
    if self.pending is None or (not wait and self.manager.is_saving_in_progress()):
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (Orbax re-raises the writer thread's error)
      raise self._failed(self.pending, e) from None
    self.last_good, self.pending = self.pending, None

  def save_now(self, step: int, state: Any) -> None:
    """Saves `step` (unless it is the save in flight or already written) and waits until it is on disk."""
    if step not in (self.pending, self.last_good):
      self.save(step, state)
    self.check(wait=True)

  def close(self) -> None:
    """Waits for a save in flight (its failure is raised) and closes the manager."""
    try:
      if not self.failed:
        self.check(wait=True)
    finally:
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if not self.failed:
          raise
        logging.info("Checkpoint manager closed after a failed save (%s).", type(e).__name__)


# --------------------------------------------------------------------------- data position across topologies


def _saved_iterator_states(step_dir: str) -> list[dict]:
  """The per-process Grain states of a checkpoint, in process order."""
  files = glob.glob(os.path.join(step_dir, DATA_ITERATOR, "process_*-of-*.json"))
  if not files:
    raise DataPositionError(f"{step_dir}: the checkpoint holds no data iterator state ({DATA_ITERATOR}/)")
  counts = {int(re.search(r"-of-(\d+)\.json$", f).group(1)) for f in files}
  if len(counts) != 1 or len(files) != next(iter(counts)):
    raise DataPositionError(f"{step_dir}/{DATA_ITERATOR}: expected one process_<i>-of-<n>.json per process, "
                            f"found {sorted(os.path.basename(f) for f in files)}")
  count = next(iter(counts))
  states = []
  for i in range(count):
    with open(os.path.join(step_dir, DATA_ITERATOR, f"process_{i}-of-{count}.json")) as f:
      states.append(json.load(f))
  return states


def _worker_count(state: dict) -> int | None:
  """Grain worker processes behind an iterator state: 0 for a plain MapDataset iterator, the number
  of worker iterators that mp_prefetch interleaves, or None for a state of another shape."""
  if set(state) == {"next_index"}:
    return 0
  if "iterators_in_use_states" in state and all(set(s) == {"next_index"} for s in state["iterators_in_use_states"]):
    return len(state["iterators_in_use_states"])
  return None


def _batches_drawn(state: dict) -> int:
  """Batches one process has drawn, from its Grain state (the worker iterators' positions add up)."""
  if set(state) == {"next_index"}:
    return int(state["next_index"])
  return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])


def iterator_state(batches_drawn: int, num_workers: int) -> dict:
  """The Grain state of a per-process iterator that has drawn `batches_drawn` batches, for 0 workers
  (a MapDataset iterator) or `num_workers` mp_prefetch workers (worker i makes batches i, i + W, ...)."""
  if num_workers == 0:
    return {"next_index": batches_drawn}
  per_worker = [max(0, -(-(batches_drawn - i) // num_workers)) for i in range(num_workers)]
  return {"next_index_in_cycle": batches_drawn % num_workers, "next_index_in_datasets": num_workers,
          "iterators_in_use_indices": list(range(num_workers)),
          "iterators_in_use_states": [{"next_index": n} for n in per_worker],
          "exhausted": [0] * num_workers, "future_states": {}}


def _move_data_position(step_dir: str, saved: list[dict], data_iterator: Any, fresh: dict,
                        global_batch_size: int | None) -> None:
  """Sets `data_iterator` to the position a run of the checkpoint's topology had reached."""
  layout_file = os.path.join(step_dir, DATA_LAYOUT, "metadata")
  layout = None
  if os.path.exists(layout_file):
    with open(layout_file) as f:
      layout = json.load(f)
  saved_workers, workers = _worker_count(saved[0]), _worker_count(fresh)
  keep = (f"resume with {len(saved)} process(es) and data.num_workers = {saved_workers}, as the checkpoint was "
          "written")
  if saved_workers is None or workers is None:
    raise DataPositionError(f"{step_dir}: a data iterator state of a shape this module cannot move "
                            f"(saved: {sorted(saved[0])}, this run: {sorted(fresh)}); {keep}")
  if layout is None or global_batch_size is None:
    raise DataPositionError(f"{step_dir}: the checkpoint does not record its data layout, so its data position "
                            f"cannot move to {jax.process_count()} process(es) with {workers} workers; {keep}")
  if layout["global_batch_size"] != global_batch_size:
    raise DataPositionError(f"{step_dir}: written with global_batch_size {layout['global_batch_size']}, this run "
                            f"has {global_batch_size}; the data position moves across topologies only with the "
                            f"same global batch; {keep}, or keep global_batch_size")
  drawn = {_batches_drawn(s) for s in saved}
  if len(drawn) != 1:
    raise DataPositionError(f"{step_dir}: the processes had drawn different numbers of batches {sorted(drawn)}; {keep}")
  batches = drawn.pop()
  new_state = iterator_state(batches, workers)
  if set(new_state) != set(fresh):
    raise DataPositionError(f"{step_dir}: this Grain version's iterator state has fields {sorted(fresh)}, not "
                            f"{sorted(new_state)}; {keep}")
  data_iterator.set_state(new_state)
  if hasattr(data_iterator, "start_prefetch"):
    data_iterator.start_prefetch()
  logging.info("Data position moved from %d process(es) x %d workers to %d x %d: %d batches drawn per process.",
               len(saved), saved_workers, jax.process_count(), workers, batches)


class ShapeMismatchError(ValueError):
  """A checkpoint holds a parameter of another shape than the config builds (e.g. another num_classes)."""


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_saved_shapes(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises ShapeMismatchError in one line naming the first array of `abstract_state` whose shape in
  checkpoint `step` differs, and both shapes (Orbax's own error names no parameter)."""
  try:
    saved = ocp.StandardCheckpointer().metadata(os.path.join(str(manager.directory), str(step), STATE))
    saved = saved.item_metadata.tree
  except Exception:  # pylint: disable=broad-except  (no readable metadata: Orbax's restore reports it)
    return
  is_leaf = lambda x: hasattr(x, "shape")
  leaves, _ = jax.tree_util.tree_flatten_with_path(saved, is_leaf=is_leaf)
  shapes = {_path_name(path): tuple(leaf.shape) for path, leaf in leaves if is_leaf(leaf)}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    name = _path_name(path)
    if name in shapes and shapes[name] != tuple(leaf.shape):
      raise ShapeMismatchError(
          f"{manager.directory}/{step}: '{name}' has shape {shapes[name]} in the checkpoint but {tuple(leaf.shape)} "
          "in this config (another model.num_classes or model size?); use the config it was trained with")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a pytree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_on_this_host(path: str) -> Any:
  """The pytree saved in a `state` folder, every array whole on this process's first device, whatever
  mesh or number of processes wrote it (Orbax alone refuses a checkpoint whose devices are not here)."""
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)


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
  (default: the same name) of the checkpoint at `path` (a training checkpoint or an export folder).

  Heads stay as initialised (a new task's heads). Every array of the subtree must be present with
  the same shape; the error names the first one that is not.
  """
  from egoexo_jax import pretrained  # pylint: disable=g-import-not-at-top  (it imports this module)
  source_subtree = pretrained.source_subtree(path, source_subtree or subtree)  # an export's single part
  step_dir, _ = pretrained.resolve(path)  # a training checkpoint or an export folder
  saved = restore_on_this_host(os.path.join(step_dir, STATE))
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
