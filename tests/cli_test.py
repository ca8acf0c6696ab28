"""cli: one-line user errors with exit status 2 (--debug: the traceback), suggestions for misspelt config
overrides, configs and their data paths found relative to the repository."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from egoexo_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_override_suggestions_name_the_nearest_fields():
  config = ml_collections.ConfigDict({"optimizer": {"base_learning_rate": 0.1, "momentum": 0.9},
                                      "data": {"crop_size": 112}, "seed": 0})
  assert cli.unknown_override(config, "optimizer.base_learning_rate") is None
  assert cli.unknown_override(config, "optimizer.base_lr") == (
      "config.optimizer has no field 'base_lr'; did you mean --config.optimizer.base_learning_rate?")
  assert cli.unknown_override(config, "optimiser.momentum") == (
      "config has no field 'optimiser'; did you mean --config.optimizer?")
  assert cli.unknown_override(config, "data.zzz") == "config.data has no field 'zzz'; its fields: crop_size"
  assert cli.unknown_override(config, "seed.x") == "'seed' is a value (int), it has no field 'x'"


def test_config_files_and_data_paths_are_found_relative_to_the_repository(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.find_config_file("configs/egoexo.py:small") == f"{ROOT}/configs/egoexo.py:small"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "egoexo.py").write_text("")
  assert cli.find_config_file("configs/egoexo.py:small") == "configs/egoexo.py:small"  # the working directory first
  config = ml_collections.ConfigDict({"data": {"manifest": "data/manifest.csv", "records": "",
                                               "pairs": "data/suml/nowhere.npz", "sub": {"csv": "data/classes.txt"}},
                                      "init_from": "data/manifest.csv"})
  cli.resolve_repo_paths(config)
  assert config.data.manifest == f"{ROOT}/data/manifest.csv" and config.data.sub.csv == f"{ROOT}/data/classes.txt"
  assert config.data.pairs == "data/suml/nowhere.npz" and config.data.records == ""  # nothing there: unchanged
  assert config.init_from == "data/manifest.csv"  # only data.* paths


def test_a_misspelt_override_is_one_line_with_a_suggestion_from_another_folder(tmp_path):
  result = run([str(ROOT / "main.py"), "--config=configs/egoexo.py:small", f"--workdir={tmp_path}/run",
                "--config.optimizer.base_lr=0.1"], cwd=tmp_path)
  assert result.returncode == cli.EXIT_USER_ERROR
  assert result.stderr.strip() == ("main.py: error: --config.optimizer.base_lr: config.optimizer has no field "
                                   "'base_lr'; did you mean --config.optimizer.base_learning_rate?")
  assert not (tmp_path / "run").exists()


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
  args = ["-m", "egoexo_jax.evaluate", f"--workdir={tmp_path}"]
  result = run(args, cwd=ROOT)
  assert result.returncode == cli.EXIT_USER_ERROR, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1] == (f"evaluate.py: error: {tmp_path}/config.json does not exist: not a workdir of this trainer, "
                       "or a run from before configs were saved; pass its config with --config=path[:arg]")
  assert "Traceback" not in result.stderr
  debug = run([*args, "--debug"], cwd=ROOT)
  assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_required_flags_are_listed_by_help():
  result = run(["-m", "egoexo_jax.evaluate", "--helpshort"], cwd=ROOT)
  assert "--workdir: Required." in result.stdout and "--step:" in result.stdout and "--config: Optional" in result.stdout
