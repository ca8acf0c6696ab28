"""Orbax checkpoints: backbone import into a model with new heads, and clear errors; a save killed
mid-write; a fully sharded 8-device checkpoint resumed on 1 device with the data position moved to
another worker count."""

import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from egoexo_jax import checkpointing, objectives, sharding, train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def saved_state(config, workdir):
  objective = objectives.resolve(config)
  optimizer, _ = train.make_optimizer(config)
  state, _ = train.create_sharded_state(objective, optimizer, config, sharding.make_mesh(1))
  manager = checkpointing.make_manager(str(workdir), max_to_keep=2, async_save=False)
  checkpointing.save(manager, 7, state)
  manager.wait_until_finished()
  return state


def fresh_state(config):
  """A new model's state of `config`'s shapes on 1 device, filled with NumPy random numbers (not the saved
  initialiser's values). load_backbone sees only shapes and values; each new model's initialiser would be one
  more long compile on CPU."""
  return random_train_state(config, sharding.make_mesh(1), seed=1)[0]


def test_load_backbone_replaces_the_backbone_and_keeps_new_heads(tmp_path):
  source = saved_state(tiny_config(**{"seed": 1}), tmp_path)
  target_config = tiny_config(**{"model.num_classes": {"action": 2}, "model.use_ego_heads": False, "seed": 2})
  target = fresh_state(target_config)
  params, batch_stats = checkpointing.load_backbone(str(tmp_path), target.params, target.batch_stats)
  for got, want in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(source.params["backbone"])):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(source.batch_stats)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(params["action_head"]["linear"]["kernel"],
                                target.params["action_head"]["linear"]["kernel"])  # the new 2-way head
  assert params["action_head"]["linear"]["kernel"].shape[-1] == 2
  # Any of the three spellings of the same checkpoint.
  for path in (tmp_path / "checkpoints", tmp_path / "checkpoints" / "7"):
    assert checkpointing.latest_step_dir(str(path)).endswith("checkpoints/7")


def test_load_backbone_errors_name_the_parameter_or_the_folder(tmp_path):
  saved_state(tiny_config(), tmp_path)
  wider = fresh_state(tiny_config(**{"model.backbone_args.width": 16}))
  with pytest.raises(ValueError, match=r"checkpoints/7: 'params/backbone\['res2_block0'\]\['\w+'\]\['\w+'\]' has shape \(8,\) in the checkpoint but \(16,\)"):
    checkpointing.load_backbone(str(tmp_path), wider.params, wider.batch_stats)
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    checkpointing.load_backbone(str(tmp_path / "elsewhere"), wider.params, wider.batch_stats)


# --------------------------------------------------------------------------- preemption and topology changes

KILLED_SAVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp
from egoexo_jax import checkpointing

def state(step):  # 64 MB: the write lasts long enough (~0.5 s) to be killed in the middle
  return {"w": jax.random.normal(jax.random.key(step), (16_000_000,)), "step": jnp.int32(step)}

manager = checkpointing.make_manager(sys.argv[2], max_to_keep=3, async_save=True)
checkpointing.save(manager, 1, state(1))
manager.wait_until_finished()
second = jax.block_until_ready(state(2))
checkpointing.save(manager, 2, second)
print("SAVING 2", flush=True)  # save() has returned; the write goes on in the background
manager.wait_until_finished()
print("SAVED 2", flush=True)
input()  # wait to be killed
"""


def run_and_kill(workdir, after_line: str) -> None:
  """Runs KILLED_SAVER and SIGKILLs it as soon as it prints `after_line`."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  child = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(ROOT), str(workdir)], stdout=subprocess.PIPE,
                           stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
  try:
    for line in child.stdout:
      if line.strip() == after_line:
        os.kill(child.pid, signal.SIGKILL)
        break
  finally:
    child.kill()
    child.wait(timeout=60)
  assert child.returncode == -signal.SIGKILL


def expected_saved(step):
  return {"w": np.asarray(jax.random.normal(jax.random.key(step), (16_000_000,))), "step": np.int32(step)}


def restore_saved(workdir, step):
  manager = checkpointing.make_manager(str(workdir), max_to_keep=3, async_save=False)
  try:
    assert manager.latest_step() == step
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected_saved(step))
    return checkpointing.restore_latest(manager, like)
  finally:
    manager.close()


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_and_a_finished_one_restores_equal(tmp_path):
  # Killed while step 2 is being written: its temporary folder is left, never a step folder "2".
  run_and_kill(tmp_path / "mid", "SAVING 2")
  left = os.listdir(tmp_path / "mid" / "checkpoints")
  assert "2" not in left and any(name.startswith("2.orbax-checkpoint-tmp") for name in left), left
  state, step = restore_saved(tmp_path / "mid", 1)  # a new process sees step 1, whole
  assert step == 1
  np.testing.assert_array_equal(state["w"], expected_saved(1)["w"])
  # Killed after the write finished: step 2 is there and restores equal.
  run_and_kill(tmp_path / "done", "SAVED 2")
  state, step = restore_saved(tmp_path / "done", 2)
  np.testing.assert_array_equal(state["w"], expected_saved(2)["w"])
  assert int(state["step"]) == 2


def grain_batches(num_workers: int):
  """A Grain stream of batches of 4 ints (a shuffled, repeated range) with `num_workers` workers."""
  import grain
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  dataset = grain.MapDataset.range(50).seed(3).shuffle().repeat().batch(4).to_iter_dataset()
  if num_workers:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(dataset)


def random_train_state(config, mesh, seed=0):
  """A train state of the tiny model's shapes filled with random numbers, in the mesh's shardings."""
  objective = objectives.resolve(config)
  optimizer, _ = train.make_optimizer(config)
  abstract, shardings = train.abstract_state(objective, optimizer, config, mesh)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), abstract)
  return jax.device_put(state, shardings), objective, optimizer


def test_fsdp_checkpoint_on_8_devices_resumes_on_1_device_and_the_data_position_moves_to_2_workers(tmp_path):
  config = tiny_config(**{"mesh.fsdp": 8, "mesh.fsdp_min_size": 0})
  state, objective, optimizer = random_train_state(config, sharding.mesh_from_config(config.mesh))
  assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params)) > 10  # fully sharded
  drawn = grain_batches(0)
  for _ in range(3):
    next(drawn)
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=2, async_save=False)
  checkpointing.save(manager, 3, state, checkpointing.DataStream(drawn, 4))
  manager.close()

  one_device = sharding.make_mesh(1)
  abstract, _ = train.abstract_state(objective, optimizer, tiny_config(**{"mesh.num_devices": 1}), one_device)
  resumed = grain_batches(2)
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=2, async_save=False)
  restored, step = checkpointing.restore_latest(manager, abstract, checkpointing.DataStream(resumed, 4))
  assert step == 3
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert got.sharding.device_set == {one_device.devices.flat[0]}
    np.testing.assert_array_equal(got, want)
  # The 2-worker iterator continues where the 0-worker one stopped.
  for _ in range(4):
    np.testing.assert_array_equal(next(resumed), next(drawn))
  resumed.close()

  # A different global batch cannot take over the position: a clear error, not another data order.
  with pytest.raises(checkpointing.DataPositionError, match="written with global_batch_size 4, this run has 8"):
    checkpointing.restore_latest(manager, abstract, checkpointing.DataStream(grain_batches(1), 8))
  manager.close()


def test_iterator_states_for_any_worker_count_and_unknown_states_are_refused(tmp_path):
  # Worker i of W makes batches i, i + W, ...: after 5 batches, W = 2 workers made 3 and 2.
  state = checkpointing.iterator_state(5, 2)
  assert [s["next_index"] for s in state["iterators_in_use_states"]] == [3, 2] and state["next_index_in_cycle"] == 1
  assert checkpointing.iterator_state(5, 0) == {"next_index": 5}
  assert [s["next_index"] for s in checkpointing.iterator_state(1, 3)["iterators_in_use_states"]] == [1, 0, 0]
  # A checkpoint written by "2 processes" with an iterator state of another shape: refused by name.
  step_dir = tmp_path / "checkpoints" / "1" / checkpointing.DATA_ITERATOR
  step_dir.mkdir(parents=True)
  for i in range(2):
    (step_dir / f"process_{i}-of-2.json").write_text('{"position": 7}')
  with pytest.raises(checkpointing.DataPositionError, match="a data iterator state of a shape this module cannot move"):
    checkpointing._move_data_position(str(step_dir.parent), checkpointing._saved_iterator_states(str(step_dir.parent)),
                                      grain_batches(0), {"next_index": 0}, 4)
