"""Device mesh and shardings: data parallelism over a `data` mesh axis with jax.jit.

The train state is replicated (P()) and the batch is split along its first axis over `data`
(P('data')). `jax.jit` with these NamedShardings is the pjit path: XLA inserts the gradient
all-reduce and the cross-device BatchNorm statistics, so the same step function runs on one
CPU, 8 fake CPU devices, one GPU, or a pod.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = -1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D `data` mesh over `num_devices` devices (-1: all), in jax.devices() order."""
  devices = list(jax.devices() if devices is None else devices)
  if num_devices != -1:
    if num_devices > len(devices):
      raise ValueError(f"mesh asks for {num_devices} devices but only {len(devices)} exist")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  if global_batch_size % mesh.size:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the {mesh.size} devices "
                     f"of the '{DATA_AXIS}' mesh axis")


def host_batch_to_global(batch: Any, mesh: Mesh) -> Any:
  """This host's slice of the batch (NumPy) -> global jax.Arrays split over `data`.

  Each host passes only the examples its own devices hold; together the hosts' slices make
  the global batch (jax.make_array_from_process_local_data).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
