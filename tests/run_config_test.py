"""run_config: the config a run saves in its workdir, the reader's check against it, flat hparams."""

import json

import ml_collections
import pytest

from egoexo_jax import run_config


def small_config():
  return ml_collections.ConfigDict({
      "objective": "egoexo", "seed": 0, "num_train_steps": 300, "init_from": "",
      "model": {"backbone": "slow_r50", "backbone_args": {"width": 16, "depths": (1, 1, 1, 1)},
                "num_classes": {"action": 5}, "dtype": "float32", "dropout_rate": 0.0},
      "data": {"crop_size": 112, "train_records": "", "manifest": "data/manifest.csv", "num_workers": 1},
      "eval": {"num_clips": 10}, "mesh": {"data": -1, "fsdp": 1},
      "optimizer": {"base_learning_rate": 0.1, "frozen": ()}})


def test_save_then_load_gives_the_config_back_and_records_each_command(tmp_path):
  config = small_config()
  assert run_config.save(config, str(tmp_path), argv=["main.py", "--config=configs/egoexo.py:small"],
                         process_index=0) == []
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["backbone_args"]["depths"] == [1, 1, 1, 1]  # readable JSON
  loaded = run_config.load(str(tmp_path))
  assert loaded.model.backbone_args.depths == (1, 1, 1, 1) and loaded.optimizer.frozen == ()
  assert loaded.to_dict() == config.to_dict()
  config.num_train_steps = 600  # a resumed start that trains longer
  assert run_config.save(config, str(tmp_path), argv=["main.py", "--config.num_train_steps=600"],
                         process_index=0) == ["num_train_steps"]
  lines = (tmp_path / "commands.txt").read_text().splitlines()
  assert len(lines) == 2 and lines[0].endswith("main.py --config=configs/egoexo.py:small")
  assert lines[1].endswith("main.py --config.num_train_steps=600")
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_only_process_0_writes(tmp_path):
  assert run_config.save(small_config(), str(tmp_path), argv=["main.py"], process_index=1) == []
  assert list(tmp_path.iterdir()) == []


def test_mismatch_is_one_line_naming_every_differing_field_and_read_time_fields_are_ignored(tmp_path):
  saved = small_config()
  given = small_config()
  # Fields that may differ between training and reading.
  given.eval.num_clips = 2
  given.num_train_steps = 1
  given.init_from = "runs/k400"
  given.data.num_workers = 8
  given.data.train_records = "/elsewhere/train.tfrecord-*"
  given.data.manifest = "/elsewhere/manifest.csv"
  given.model.dtype = "bfloat16"
  given.mesh.fsdp = 8
  run_config.check_matches(saved, given)
  given.model.num_classes.action = 10
  given.optimizer.base_learning_rate = 0.2
  with pytest.raises(run_config.ConfigMismatchError) as error:
    run_config.check_matches(saved.to_dict(), given, where="runs/x/config.json")
  message = str(error.value)
  assert "\n" not in message
  assert "differs from runs/x/config.json in 2 field(s)" in message
  assert "model.num_classes.action: saved 5, given 10" in message
  assert "optimizer.base_learning_rate: saved 0.1, given 0.2" in message
  del given.optimizer["base_learning_rate"]  # a field only one side has differs too
  assert ("optimizer.base_learning_rate", 0.1, run_config.ABSENT) in run_config.differences(saved, given)


def test_resolve_uses_the_saved_config_and_checks_a_given_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json does not exist.*--config"):
    run_config.resolve(str(tmp_path), None)
  given = small_config()
  assert run_config.resolve(str(tmp_path), given) is given  # a run from before configs were saved
  run_config.save(small_config(), str(tmp_path), argv=["main.py"], process_index=0)
  assert run_config.resolve(str(tmp_path), None).model.backbone == "slow_r50"
  given.eval.num_clips = 1
  assert run_config.resolve(str(tmp_path), given).eval.num_clips == 1  # test-time settings of the given one
  given.model.backbone = "i3d_r50"
  with pytest.raises(run_config.ConfigMismatchError, match=r"model.backbone: saved \"slow_r50\", given \"i3d_r50\""):
    run_config.resolve(str(tmp_path), given)


def test_flat_hparams_holds_every_leaf_as_a_scalar():
  flat = run_config.flat_hparams(small_config())
  assert flat["optimizer.base_learning_rate"] == 0.1 and flat["model.backbone"] == "slow_r50"
  assert flat["model.num_classes.action"] == 5 and flat["model.backbone_args.depths"] == "[1, 1, 1, 1]"
  assert flat["optimizer.frozen"] == "[]" and flat["seed"] == 0
  assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
  assert len(flat) == 19
