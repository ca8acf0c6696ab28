"""Device mesh and shardings: data parallelism plus fully sharded parameters, with jax.jit.

The mesh has two axes, `data` x `fsdp` (config.mesh.data, config.mesh.fsdp; -1 = all the devices
left). Everything is expressed as NamedShardings and `jax.jit` (the pjit path); XLA inserts the
collectives, so one step function runs on one CPU, 8 fake CPU devices, one GPU, or a pod.

- The batch is split along its first axis over both axes, P(('data', 'fsdp')): every device holds
  B / (data * fsdp) examples. Each host builds only the examples its own devices hold.
- Parameters and optimiser state are replicated when fsdp = 1. With fsdp = n > 1 each array of at
  least `min_size` elements is split n ways along its largest dimension divisible by n (the last such
  dimension on ties: output channels); an array with no such dimension stays replicated. XLA gathers a
  kernel when a step uses it and reduce-scatters its gradient, so each device keeps 1/n of the state.
  This is the rule big_vision calls "fsdp" and MaxText's default for weights.
- BatchNorm statistics and the step counter are small and replicated.

Objectives with explicit collectives (jax.shard_map) split the batch over `BATCH_AXES` and reduce over
`BATCH_AXES`; `DATA_AXIS` alone is the same thing when fsdp = 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch's first axis is split over both
DEFAULT_FSDP_MIN_SIZE = 2**14  # elements; smaller arrays are replicated (sharding them saves nothing)


def make_mesh(num_devices: int = -1, devices: Sequence[jax.Device] | None = None, *, data: int = -1,
              fsdp: int = 1) -> Mesh:
  """A `data` x `fsdp` mesh over the first `num_devices` devices (-1: all) of `devices` (jax.devices()).

  `data` -1 takes the devices that `fsdp` leaves. Devices are laid out by jax.make_mesh, which on
  GPU and TPU keeps `fsdp` neighbours on fast links; in multi-process runs jax.devices() is ordered by
  process, so each host's devices hold a contiguous block of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices != -1:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"config mesh.num_devices is {num_devices} but {len(devices)} devices exist")
    devices = devices[:num_devices]
  if fsdp == -1 and data == -1:
    raise ValueError("config mesh.data and mesh.fsdp cannot both be -1")
  if fsdp == -1:
    fsdp = len(devices) // data if data > 0 else 0
  if data == -1:
    data = len(devices) // fsdp if fsdp > 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != len(devices):
    raise ValueError(f"config mesh asks for data={data} x fsdp={fsdp} devices but {len(devices)} are used "
                     "(mesh.num_devices); their product must equal it")
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=np.asarray(devices))


def mesh_from_config(mesh_config) -> Mesh:
  """The mesh of `config.mesh`: num_devices (-1 all), data (-1: the rest), fsdp (default 1)."""
  return make_mesh(mesh_config.get("num_devices", -1), data=mesh_config.get("data", -1),
                   fsdp=mesh_config.get("fsdp", 1))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch's first axis over `data` x `fsdp`, the other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """PartitionSpec of one parameter-shaped array: its largest dimension divisible by `fsdp_size` over
  `fsdp` (the last one on ties), or P() (replicated) when fsdp_size is 1, the array has fewer than
  `min_size` elements, or no dimension divides.

  >>> fsdp_spec((3, 3, 64, 128), 4, 0)   # (kh, kw, in, out): output channels
  PartitionSpec(None, None, None, 'fsdp')
  """
  if fsdp_size == 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + [FSDP_AXIS]))


def fsdp_shardings(tree: Any, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """NamedShardings for every array of `tree` (arrays or ShapeDtypeStructs) by `fsdp_spec`."""
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size, min_size)), tree)


def train_state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """Shardings of a train state (fields step, params, batch_stats, opt_state): params and optimiser
  state by `fsdp_spec` (optimiser moments have their parameter's shape, so they shard alike), the
  step and BatchNorm statistics replicated."""
  every = lambda tree: jax.tree.map(lambda _: replicated(mesh), tree)
  return abstract_state.replace(step=replicated(mesh), params=fsdp_shardings(abstract_state.params, mesh, min_size),
                                batch_stats=every(abstract_state.batch_stats),
                                opt_state=fsdp_shardings(abstract_state.opt_state, mesh, min_size))


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  if global_batch_size % mesh.size:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the {mesh.size} devices of the "
                     f"mesh {dict(mesh.shape)} (the batch is split over {' x '.join(BATCH_AXES)})")
  if global_batch_size % jax.process_count():
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the {jax.process_count()} "
                     "processes")


def host_batch_to_global(batch: Any, mesh: Mesh) -> Any:
  """This host's slice of the batch (NumPy) -> global jax.Arrays split over `data` x `fsdp`.

  Each host passes only the examples its own devices hold; together the hosts' slices make
  the global batch (jax.make_array_from_process_local_data).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
