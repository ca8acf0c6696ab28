"""Export folders as inputs (egoexo_jax/pretrained.py): load_pretrained, init_from, evaluate, the Ego-Score
teacher, EVGAP feature extraction, the SUM-L ego encoder, and card/config mismatches.

Workdirs here hold one checkpoint written in the trainer's layout from random variables (conftest
write_checkpoint), so each test exports in seconds without training.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import egoexo_jax
from configs import evgap_group as evgap_group_config
from configs import suml as suml_config
from conftest import random_variables, tiny_config, write_checkpoint
from egoexo_jax import checkpointing, evaluate, export, objectives, pretrained, sharding, train
from egoexo_jax.downstream import extract
from egoexo_jax.models import backbones, transformer
from egoexo_jax.pseudo_labels import ego_score


def synthetic_run(config, workdir, seed=0):
  """(workdir with one checkpoint of random variables of config's model, those variables)."""
  objective = objectives.resolve(config)
  shapes = jax.eval_shape(lambda: train.init_variables(objective, config, jax.random.key(0)))
  variables = random_variables(shapes, seed)
  return write_checkpoint(workdir, variables), variables


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def egoexo_export(tmp_path_factory):
  """(config, variables, export folder) of a tiny Ego-Exo model."""
  config = tiny_config()
  workdir, variables = synthetic_run(config, tmp_path_factory.mktemp("egoexo_run"))
  output = str(tmp_path_factory.mktemp("exports") / "egoexo")
  export.export(workdir, output, config=config, forward=False)
  return config, variables, output


def test_init_from_starts_a_new_task_from_an_export(egoexo_export):
  config, variables, output = egoexo_export
  assert train.parse_init_from(output) == {"backbone": (output, "backbone")}
  new_task = objectives.resolve(tiny_config(**{"model.num_classes": {"action": 7}, "model.use_ego_heads": False})).model
  fresh = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), jax.eval_shape(
      lambda x: new_task.init(jax.random.key(0), x, train=False), jax.ShapeDtypeStruct((1, 4, 64, 64, 3), jnp.float32)))
  params, batch_stats = checkpointing.load_backbone(output, fresh["params"], fresh["batch_stats"])
  assert_same(params["backbone"], variables["params"]["backbone"])
  assert_same(batch_stats["backbone"], variables["batch_stats"]["backbone"])
  np.testing.assert_array_equal(params["action_head"]["linear"]["kernel"], 0.5)  # the new task's head


def test_evaluate_reads_an_export_and_names_a_mismatched_field(egoexo_export):
  config, variables, output = egoexo_export
  mesh = sharding.make_mesh(8)
  model, restored, step = evaluate.restore_variables(config, output, mesh)
  assert step == 7 and model == objectives.resolve(config).model
  assert_same(restored, variables)
  assert restored["params"]["backbone"]["stem"]["conv"]["kernel"].sharding.is_fully_replicated

  with pytest.raises(pretrained.ExportMismatchError, match=rf"^{output} was made with model.num_classes.action=3, the "
                                                           r"config has model.num_classes.action=5$"):
    evaluate.restore_variables(tiny_config(**{"model.num_classes": {"action": 5}}), output, mesh)
  with pytest.raises(pretrained.ExportMismatchError, match=r"model.backbone=\"slow_r50\", the config has "
                                                           r"model.backbone=\"i3d_r50\""):
    evaluate.restore_variables(tiny_config(**{"model.backbone": "i3d_r50"}), output, mesh)
  # Compute-only fields may differ: a bfloat16 evaluation of a float32 export.
  evaluate.restore_variables(tiny_config(**{"model.dtype": "bfloat16", "model.dropout_rate": 0.0}), output, mesh)


def test_variables_that_do_not_fit_the_config_are_named(egoexo_export, tmp_path):
  config, _, output = egoexo_export
  older = str(tmp_path / "older")
  shutil.copytree(output, older)
  card = pretrained.read_card(older)
  del card["model"]["backbone_args"]  # a card without the field: only the shapes can tell
  with open(os.path.join(older, pretrained.CARD), "w") as f:
    json.dump(card, f)
  with pytest.raises(pretrained.ExportMismatchError, match=r"older: variable \['batch_stats'\]\['backbone'\]"
                                                           r"\['res2_block0'\]\['bn_a'\]\['mean'\] is \(8,\) in the "
                                                           r"export, \(16,\) in the config's model$"):
    evaluate.restore_variables(tiny_config(**{"model.backbone_args.width": 16}), older, sharding.make_mesh(1))


def test_ego_score_teacher_reads_an_export(tmp_path):
  config = tiny_config(**{"model.num_classes": {"action": 2}, "model.use_ego_heads": False})
  workdir, variables = synthetic_run(config, tmp_path / "classifier", seed=1)
  export.export(workdir, str(tmp_path / "export"), config=config, forward=False)
  model, restored = ego_score.load_classifier(config, str(tmp_path / "export"))
  assert model == objectives.resolve(config).model
  assert_same(restored, variables)


def test_suml_ego_encoder_exports_as_a_backbone(tmp_path):
  config = suml_config.get_config("small")
  config.model.backbone_args.width = 8
  config.data.clip_length, config.data.crop_size = 4, 32
  workdir, variables = synthetic_run(config, tmp_path / "suml", seed=2)
  card = export.export(workdir, str(tmp_path / "ego"), config=config, part="ego_backbone", pyslowfast=True)
  assert card["part"] == "ego_backbone" and card["input"]["shape"] == [1, 4, 32, 32, 3]
  assert card["num_parameters"] == sum(np.size(x) for x in jax.tree.leaves(variables["params"]["ego_backbone"]))
  assert card["files"]["pyslowfast"]["keys"] > 0

  module, loaded = egoexo_jax.load_pretrained(str(tmp_path / "ego"))
  assert isinstance(module, backbones.BACKBONES["slow_r50"][0])
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  from egoexo_jax.input import transforms  # pylint: disable=g-import-not-at-top
  uint8 = np.random.default_rng(0).integers(0, 256, (1, 4, 32, 32, 3), dtype=np.uint8)
  clips = transforms.normalize_clips(uint8, jnp.float32)
  reference = backbones.build_backbone("slow_r50", config.model.backbone_args)
  want = jax.jit(lambda v, x: reference.apply(v, x, train=False))(
      {"params": variables["params"]["ego_backbone"], "batch_stats": variables["batch_stats"]["ego_backbone"]}, clips)
  np.testing.assert_allclose(apply(loaded, clips)[0], want[0], rtol=1e-6, atol=1e-6)

  # init_from=<this export> starts a 'backbone' (its single part), e.g. of a fine-tuning or Ego-Exo run.
  fresh = {"backbone": jax.tree.map(np.zeros_like, variables["params"]["ego_backbone"])}
  params, _ = checkpointing.load_backbone(str(tmp_path / "ego"), fresh, {})
  assert_same(params["backbone"], variables["params"]["ego_backbone"])

  # The serialised forward function gives the backbone's pathway features.
  with open(tmp_path / "ego" / pretrained.FORWARD, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  np.testing.assert_allclose(exported.call(loaded, uint8)[0], want[0], rtol=1e-5, atol=1e-5)

  with pytest.raises(ValueError, match=r"no parameter subtree 'backbone' \(it has \["):
    export.export(workdir, str(tmp_path / "shared"), config=config, part="backbone")


def test_evgap_encoder_export_feeds_feature_extraction(tmp_path):
  config = evgap_group_config.get_config("small")
  workdir, variables = synthetic_run(config, tmp_path / "evgap", seed=3)
  card = export.export(workdir, str(tmp_path / "encoder"), config=config, part="encoder")
  assert card["part"] == "encoder" and card["input"]["shape"] == [1, config.data.window_frames, config.data.feature_dim]

  model, params = extract.load_encoder(config, str(tmp_path / "encoder"))
  assert_same(params["encoder"], variables["params"]["encoder"])

  encoder, loaded = egoexo_jax.load_pretrained(str(tmp_path / "encoder"))
  assert isinstance(encoder, transformer.SequenceEncoder) and set(loaded) == {"params"}
  windows = np.asarray(jax.random.normal(jax.random.key(1), (1, config.data.window_frames, config.data.feature_dim)))
  want = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False, method="encode"))(params, windows)
  got = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(loaded, windows)
  np.testing.assert_allclose(got["class_tokens"], want["class_tokens"], rtol=1e-5, atol=1e-5)
  with open(tmp_path / "encoder" / pretrained.FORWARD, "rb") as f:
    served = jax.export.deserialize(bytearray(f.read())).call(loaded, windows)
  np.testing.assert_allclose(served["tokens"], want["tokens"], rtol=1e-5, atol=1e-5)

  other = evgap_group_config.get_config("small")
  other.model.num_heads = 2
  with pytest.raises(pretrained.ExportMismatchError, match=r"was made with model.num_heads=4, the config has "
                                                           r"model.num_heads=2"):
    extract.load_encoder(other, str(tmp_path / "encoder"))
  with pytest.raises(ValueError, match="EVGAP encoder has no PySlowFast form"):
    export.export(workdir, str(tmp_path / "pyth"), config=config, part="encoder", pyslowfast=True)


def test_a_part_export_is_not_a_whole_model(tmp_path, egoexo_export):
  config, _, output = egoexo_export
  workdir = write_checkpoint(tmp_path / "run", pretrained.restore_variables(output))
  export.export(workdir, str(tmp_path / "backbone"), config=config, part="backbone", forward=False)
  with pytest.raises(pretrained.ExportMismatchError, match="holds only part 'backbone' of a model"):
    evaluate.restore_variables(config, str(tmp_path / "backbone"), sharding.make_mesh(1))
  assert not pretrained.is_export(str(tmp_path / "run"))
  assert pretrained.resolve(str(tmp_path / "run")) == (os.path.join(str(tmp_path / "run"), "checkpoints", "7"), None)
