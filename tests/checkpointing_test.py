"""Orbax checkpoints: backbone import into a model with new heads, and clear errors."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from egoexo_jax import checkpointing, sharding, train
from egoexo_jax.models import build_model


def saved_state(config, workdir):
  model = build_model(config.model)
  optimizer, _ = train.make_optimizer(config)
  state, _ = train.create_sharded_state(model, optimizer, config, sharding.make_mesh(1))
  manager = checkpointing.make_manager(str(workdir), max_to_keep=2, async_save=False)
  checkpointing.save(manager, 7, state)
  manager.wait_until_finished()
  return state


def fresh_state(config):
  model = build_model(config.model)
  optimizer, _ = train.make_optimizer(config)
  state, _ = train.create_sharded_state(model, optimizer, config, sharding.make_mesh(1))
  return state


def test_load_backbone_replaces_the_backbone_and_keeps_new_heads(tmp_path):
  source = saved_state(tiny_config(**{"seed": 1}), tmp_path)
  target_config = tiny_config(**{"model.num_classes": 2, "model.use_ego_heads": False, "seed": 2})
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
