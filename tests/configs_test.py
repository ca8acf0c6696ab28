"""configs/egoexo.py: both sizes build, and the pipeline's map grid is the model's res5 grid."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from egoexo_jax import objectives
from egoexo_jax.objectives import egoexo as egoexo_objective

CONFIG_FILE = pathlib.Path(__file__).resolve().parent.parent / "configs" / "egoexo.py"


def load(arg):
  spec = importlib.util.spec_from_file_location("egoexo_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("arg,grid", [("", (8, 7, 7)), ("small", (8, 4, 4))])
def test_interaction_targets_match_the_model_grid(arg, grid):
  config = load(arg)
  objective = objectives.resolve(config)
  model = objective.model
  assert egoexo_objective.interaction_grid(model, config) == grid
  clips = objective.example_batch(config, 2)["clips"]
  shapes = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
                          jax.ShapeDtypeStruct(clips.shape, jnp.float32))
  assert shapes["interaction"].shape == (2, *grid, 2)
  assert shapes["object"].shape == (2, config.model.num_object_classes)


def test_paper_defaults_and_small_switch():
  full, small = load(""), load("small")
  assert (full.loss.weight_ego_score, full.loss.weight_object, full.loss.weight_interaction) == (0.1, 0.5, 1.0)
  assert (full.data.clip_length, full.data.frame_stride, full.data.crop_size) == (8, 8, 224)
  assert (full.data.min_short_side, full.data.max_short_side) == (256, 320)
  assert full.model.backbone == "slow_r50" and not full.model.backbone_args and full.model.dtype == "bfloat16"
  assert full.optimizer.momentum == 0.9 and full.optimizer.weight_decay == 1e-4
  assert small.num_train_steps < 1000 and small.model.num_classes.to_dict() == {"action": 5}  # data/classes.txt
  with pytest.raises(ValueError, match="unknown config argument 'tiny'"):
    load("tiny")


# --------------------------------------------------------------------------- configs/common.py, python -m configs


def test_config_argument_is_parsed_in_any_order_and_errors_list_the_valid_ones():
  from configs import common  # pylint: disable=g-import-not-at-top
  spec = common.ArgSpec(options=("star",), variants=("base", "other"), default_recipe="released")
  assert common.parse_arg("paper, star,small", "configs/x.py", spec) == common.Arg(
      small=True, options=frozenset({"star"}), variant="base", recipe="paper")
  assert common.parse_arg("", "configs/x.py", spec) == common.Arg(False, frozenset(), "base", "released")
  assert common.parse_arg("other", "configs/x.py", spec).variant == "other"
  for arg, problem in [("small,tiny", "'tiny' not taken"), ("base,other", "at most one variant"),
                       ("paper,released", "at most one recipe"), ("released", "'released' not taken")]:
    with pytest.raises(ValueError) as error:
      common.parse_arg(arg, "configs/x.py", spec if problem != "'released' not taken" else common.ArgSpec())
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"unknown config argument '{arg}' for configs/x.py: ")
    assert problem in message and "valid (comma-separated): small" in message


def test_python_m_configs_lists_every_config_with_its_arguments():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = CONFIG_FILE.parent.parent
  listing = subprocess.run([sys.executable, "-m", "configs"], cwd=root, capture_output=True, text=True,
                           check=True).stdout
  stems = sorted(p.stem for p in (root / "configs").glob("[a-z]*.py") if "def get_config(" in p.read_text())
  assert stems and all(f"configs/{stem}.py" in listing for stem in stems)
  assert "configs/common_recipe.py" not in listing and "configs/recipe_suml.py" not in listing
  for stem in stems:  # each docstring's first line
    text = (root / "configs" / f"{stem}.py").read_text()
    doc = text.split('"""', 2)[1].lstrip("\n").splitlines()[0]
    assert doc in listing, stem
  assert "arguments: small, star; at most one recipe of released, paper (default released)" in listing
  assert "at most one variant of suml, fpv_only" in listing
