"""The data x fsdp mesh: the sharding rule by hand, and fully sharded training = single-device training."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import model_grid, tiny_config
from egoexo_jax import objectives, sharding, train
from egoexo_jax.input import egoexo_pipeline


def test_fsdp_spec_shards_the_largest_divisible_dimension():
  # (kh, kw, in, out) conv kernel: out (128) is the largest dimension divisible by 4.
  assert sharding.fsdp_spec((3, 3, 64, 128), 4, 0) == P(None, None, None, "fsdp")
  # (in, out) = (2048, 400): 2048 is the largest divisible by 8 (400 is too, but smaller).
  assert sharding.fsdp_spec((2048, 400), 8, 0) == P("fsdp")
  # Ties go to the last dimension; non-divisible dimensions are never chosen.
  assert sharding.fsdp_spec((64, 64), 8, 0) == P(None, "fsdp")
  assert sharding.fsdp_spec((12, 6), 8, 0) == P()
  assert sharding.fsdp_spec((1, 3, 3, 3, 24), 8, 0) == P(None, None, None, None, "fsdp")
  # Scalars, fsdp = 1 and arrays under the minimum size stay replicated.
  assert sharding.fsdp_spec((), 8, 0) == P()
  assert sharding.fsdp_spec((512, 512), 1, 0) == P()
  assert sharding.fsdp_spec((64, 64), 8, 64 * 64 + 1) == P()
  assert sharding.fsdp_spec((64, 64), 8, 64 * 64) == P(None, "fsdp")


def test_mesh_from_config_and_its_errors():
  mesh = sharding.make_mesh(fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4} and mesh.axis_names == sharding.BATCH_AXES
  assert dict(sharding.make_mesh(4, fsdp=2).shape) == {"data": 2, "fsdp": 2}
  assert dict(sharding.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}
  assert dict(sharding.mesh_from_config(tiny_config().mesh).shape) == {"data": 8, "fsdp": 1}
  with pytest.raises(ValueError, match=r"data=3 x fsdp=2 devices but 8 are used"):
    sharding.make_mesh(data=3, fsdp=2)
  with pytest.raises(ValueError, match="mesh.num_devices is 16 but 8 devices exist"):
    sharding.make_mesh(16)
  with pytest.raises(ValueError, match=r"not divisible by the 8 devices of the mesh \{'data': 2, 'fsdp': 4\}"):
    sharding.check_batch_divisible(12, mesh)


def assert_fully_sharded(state):
  """Kernels split 8 ways over `fsdp` by fsdp_spec, optimiser moments alike; BatchNorm and step replicated."""
  kernel = state.params["backbone"]["res2_block0"]["conv_c"]["kernel"]
  spec = sharding.fsdp_spec(kernel.shape, 8, 0)
  assert spec != P() and kernel.sharding.spec == spec
  axis = list(spec).index("fsdp")
  assert kernel.addressable_shards[0].data.shape[axis] == kernel.shape[axis] // 8  # 1/8 per device
  assert any(m.sharding.spec == spec and m.shape == kernel.shape for m in jax.tree.leaves(state.opt_state))
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(state.batch_stats)) and state.step.sharding.spec == P()
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.params))
  assert per_device < 0.3 * sum(x.nbytes for x in jax.tree.leaves(state.params))


def test_fully_sharded_training_equals_single_device_training(real_record_pattern):
  """data 2 x fsdp 4 and data 1 x fsdp 8 (every array that divides sharded) against one device, 2 steps."""
  config = tiny_config(real_record_pattern, **{"mesh.fsdp_min_size": 0})
  objective = objectives.resolve(config)
  optimizer, schedule = train.make_optimizer(config)
  iterator = iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=model_grid(config)))
  batches = [train.split_host_keys(next(iterator))[0] for _ in range(2)]
  initial, _ = train.create_sharded_state(objective, optimizer, config, sharding.make_mesh(1))
  initial = jax.device_get(initial)  # one initialisation (a long compile on CPU), placed on each mesh
  results = []
  for mesh in (sharding.make_mesh(1), sharding.make_mesh(data=2, fsdp=4), sharding.make_mesh(data=1, fsdp=8)):
    _, state_shardings = train.abstract_state(objective, optimizer, config, mesh)
    state = jax.device_put(initial, state_shardings)
    if mesh.shape["fsdp"] == 8:
      assert_fully_sharded(state)
    step_fn = train.make_step_fn(objective, optimizer, schedule, config, mesh, state_shardings)
    for batch in batches:
      global_batch = sharding.host_batch_to_global(batch, mesh)
      assert len(global_batch["clips"].addressable_shards) == mesh.size
      state, _, terms = step_fn(state, global_batch)
    results.append(jax.device_get((state.params, state.batch_stats, state.opt_state, terms)))
  assert np.isfinite(results[0][3]["loss"])
  for sharded in results[1:]:
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(sharded)):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)  # the same maths, other reduction orders
