"""Export (egoexo_jax/export.py) and PySlowFast .pyth out (models/export_weights.py).

The .pyth files are checked against PyTorch networks with PySlowFast's module tree (conftest.VideoResNet),
loaded with a strict `load_state_dict`, and against our own importer (round trip). The export folder of a
trained tiny run is checked against the training checkpoint, and its serialised forward function is called
in a Python process that cannot import egoexo_jax.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import egoexo_jax
from conftest import ROOT, VideoResNet, pack_pathways, random_variables, tiny_config, write_checkpoint
from egoexo_jax import checkpointing, export, objectives, pretrained
from egoexo_jax.input import transforms
from egoexo_jax.models import egoexo, export_weights, import_weights
from egoexo_jax.models.resnet2d import WeightImportError

TINY_BLOCKS = (1, 1, 1, 1)
TINY = dict(stage_blocks=TINY_BLOCKS, width=16)

# --------------------------------------------------------------------------- PySlowFast .pyth out


@pytest.mark.parametrize("arch,ego_heads", [("slow_r50", False), ("slowfast_r50", True), ("i3d_r50", True)])
def test_pyslowfast_export_round_trips_and_gives_pyslowfast_outputs(arch, ego_heads, tmp_path):
  model = egoexo.Model(num_classes=5, num_object_classes=12, backbone=arch, backbone_args=TINY, dropout_rate=0.0,
                       interaction_channels=32, use_ego_heads=ego_heads)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 8, 64, 64, 3), jnp.float32))
  variables = random_variables(shapes, seed=len(arch))
  path = tmp_path / "model.pyth"
  info = export_weights.export_pyth(variables, {"backbone": arch, "backbone_args": TINY}, str(path),
                                    data_config={"clip_length": 8, "frame_stride": 8, "crop_size": 64}, epoch=3)
  assert info["left_out"] == [] and info["arch"] == {"slow_r50": "slow", "slowfast_r50": "slowfast",
                                                      "i3d_r50": "i3d"}[arch]

  # Round trip: our importer gives back exactly the exported variables, every subtree.
  back, arguments = import_weights.convert_pyslowfast(import_weights.load_pyslowfast_checkpoint(str(path)), arch,
                                                      backbone_args=TINY)
  assert arguments["heads"] == (["action_head", "ego_head", "object_head", "interaction_head"] if ego_heads
                                else ["action_head"])
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, back, variables)

  # PySlowFast's network loads it strictly (every key, num_batches_tracked included) and computes the same.
  checkpoint = torch.load(path, weights_only=True)
  assert checkpoint["epoch"] == 3 and f"ARCH: {info['arch']}" in checkpoint["cfg"]
  assert "DEPTH: null" in checkpoint["cfg"]  # one block per stage: no PySlowFast depth
  slowfast = arch == "slowfast_r50"
  torch_model = VideoResNet(TINY_BLOCKS, 5, slowfast, width=16, egoexo_heads=ego_heads, interaction_channels=32,
                            num_object_classes=12, i3d=arch == "i3d_r50")
  torch_model.load_state_dict(checkpoint["model_state"], strict=True)
  torch_model.eval()
  frames = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want, _ = torch_model(pack_pathways(frames, slowfast))
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, frames.numpy().transpose(0, 2, 3, 4, 1))
  assert set(want) == ({"action", "ego_score", "object", "interaction"} if ego_heads else {"action"})
  for name, value in want.items():
    error = float(np.max(np.abs(np.asarray(got[name]) - value.numpy())))
    print(f"{arch} {name}: max |error| {error:.2e}, |value| up to {np.abs(value.numpy()).max():.2f}")
    assert error < 1e-4, name
    assert np.abs(value.numpy()).max() > 0.05  # not a comparison of near-zero outputs


def test_pyslowfast_export_refuses_what_pyslowfast_cannot_hold():
  model = egoexo.Model(num_classes=3, backbone="tsm_r50", backbone_args=TINY, use_ego_heads=False)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.float32))
  with pytest.raises(WeightImportError, match=r"backbone 'tsm_r50' has no PySlowFast counterpart"):
    export_weights.to_pyslowfast(random_variables(shapes), "tsm_r50")
  # Heads without a PySlowFast name (a fine-tuning run's verb/noun heads) are left out and listed.
  variables = random_variables(shapes)
  variables["params"]["verb_head"] = variables["params"].pop("action_head")
  state_dict, left_out = export_weights.to_pyslowfast(variables, "slow_r50")
  assert left_out == ["verb_head"] and not any(k.startswith("head.") for k in state_dict)


# --------------------------------------------------------------------------- export of a trained run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(config, workdir) of a tiny Ego-Exo run as the trainer leaves it: checkpoints at steps 2 and 4 (random
  variables), TensorBoard scalars written with the trainer's and evaluate's writers, a record shard with
  the converter's summary beside it."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("egoexo_run")
  records = tmp_path_factory.mktemp("records")
  (records / "train.tfrecord-00000-of-00001").write_bytes(b"\0" * 1000)
  (records / "train.json").write_text(json.dumps({"manifest": "videos.csv", "num_records": 6}))
  config = tiny_config(str(records / "train.tfrecord-*"))
  model = objectives.resolve(config).model
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 4, 64, 64, 3), jnp.float32))
  for step in (2, 4):
    write_checkpoint(workdir, random_variables(shapes, seed=step), step=step)
  writer = metric_writers.create_default_writer(str(workdir))
  writer.write_scalars(2, {"train/loss": 2.0, "train/accuracy": 0.5})
  writer.write_scalars(4, {"train/loss": 1.5, "train/accuracy": 0.25})
  writer.close()
  writer = metric_writers.create_default_writer(str(workdir), collection="eval")
  writer.write_scalars(4, {"eval/mAP": 0.75})
  writer.close()
  return config, str(workdir)


FORWARD_WITHOUT_EGOEXO_JAX = """
import sys
import jax, numpy as np, orbax.checkpoint as ocp
folder, clips, result = sys.argv[1:]
tree = ocp.StandardCheckpointer().restore(folder + "/state")
with open(folder + "/forward.jax_export", "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
outputs = exported.call({"params": tree["params"], "batch_stats": tree["batch_stats"]}, np.load(clips))
assert not [m for m in sys.modules if m.startswith("egoexo_jax")]
np.savez(result, **{k: np.asarray(v) for k, v in outputs.items()})
"""


def test_export_holds_the_inference_variables_a_card_and_a_forward_function(trained_run, tmp_path):
  config, workdir = trained_run
  output = str(tmp_path / "export")
  card = export.export(workdir, output, config=config)
  assert sorted(os.listdir(output)) == ["MODEL_CARD.md", "forward.jax_export", "model_card.json", "state"]

  # Variables: exactly the newest checkpoint's parameters and BatchNorm statistics, nothing else.
  training = checkpointing.restore_on_this_host(os.path.join(workdir, "checkpoints", "4", "state"))
  exported = pretrained.restore_variables(output)
  assert set(exported) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, exported["params"], training["params"])
  jax.tree.map(np.testing.assert_array_equal, exported["batch_stats"], training["batch_stats"])

  # The card.
  assert json.load(open(os.path.join(output, "model_card.json"))) == card
  assert (card["part"], card["objective"], card["backbone"], card["dtype"]) == ("model", "egoexo", "slow_r50",
                                                                                 "float32")
  assert card["num_parameters"] == sum(np.size(x) for x in jax.tree.leaves(training["params"]))
  assert card["input"]["shape"] == [1, 4, 64, 64, 3]
  assert (card["input"]["frames"], card["input"]["frame_stride"], card["input"]["crop_size"]) == (4, 2, 64)
  assert card["input"]["mean"] == [transforms.MEAN] * 3 and card["input"]["std"] == [transforms.STD] * 3
  assert card["training"] == {"step": 4, "num_train_steps": 4, "global_batch_size": 8, "examples_seen": 32}
  assert card["config"] == json.loads(json.dumps(config.to_dict())) and card["config_source"] == "--config"
  assert card["recipe"] == config.recipe == "released"  # configs/recipe_egoexo.py holds its sources
  records = card["data"]["record_sets"]["train_records"]
  assert (records["files"], records["bytes"], records["records"]) == (1, 1000, 6)
  metrics = card["metrics"]
  assert metrics["final"]["train/loss"] == {"step": 4, "value": 1.5}
  assert metrics["best"]["train/loss"] == {"step": 4, "value": 1.5, "mode": "min"}
  assert metrics["final"]["train/accuracy"] == {"step": 4, "value": 0.25}
  assert metrics["best"]["train/accuracy"] == {"step": 2, "value": 0.5, "mode": "max"}
  assert metrics["final"]["eval/mAP"] == {"step": 4, "value": 0.75} and "eval" in metrics["source"]
  commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
  assert card["version"]["git_commit"] == (commit.stdout.strip() if commit.returncode == 0 else "unknown")
  assert card["files"]["state_bytes"] < 0.75 * card["source"]["checkpoint_bytes"]  # no optimiser state
  markdown = open(os.path.join(output, "MODEL_CARD.md")).read()
  assert f"Parameters: {card['num_parameters']:,} (float32)" in markdown and "train/loss: final" in markdown

  # One-call loading gives the trained model's outputs.
  clips = np.random.default_rng(0).integers(0, 256, (1, 4, 64, 64, 3), dtype=np.uint8)
  normalized = transforms.normalize_clips(clips, jnp.float32)
  want = jax.jit(lambda v, x: objectives.resolve(config).model.apply(v, x, train=False))(
      {"params": training["params"], "batch_stats": training["batch_stats"]}, normalized)
  model, variables = egoexo_jax.load_pretrained(output)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, normalized)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)

  # The serialised forward function, in a process that cannot import egoexo_jax.
  np.save(tmp_path / "clips.npy", clips)
  environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  result = subprocess.run([sys.executable, "-c", FORWARD_WITHOUT_EGOEXO_JAX, output, str(tmp_path / "clips.npy"),
                           str(tmp_path / "outputs.npz")], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(environment, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  served = np.load(tmp_path / "outputs.npz")
  assert set(served) == set(want) and card["files"]["forward"]["platforms"][0] == "cpu"
  for name in want:
    np.testing.assert_allclose(served[name], want[name], rtol=1e-5, atol=1e-5)


def test_bfloat16_export_halves_the_variables(trained_run, tmp_path):
  config, workdir = trained_run
  full = export.export(workdir, str(tmp_path / "f32"), config=config, forward=False)
  half = export.export(workdir, str(tmp_path / "bf16"), config=config, forward=False, dtype="bfloat16")
  assert half["dtype"] == "bfloat16" and half["files"]["forward"] is None
  assert half["files"]["state_bytes"] < 0.6 * full["files"]["state_bytes"]
  model, variables = egoexo_jax.load_pretrained(str(tmp_path / "bf16"))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  _, reference = egoexo_jax.load_pretrained(str(tmp_path / "f32"))
  for key_path, value in jax.tree_util.tree_flatten_with_path(variables)[0][:5]:
    want = np.asarray(dict(jax.tree_util.tree_flatten_with_path(reference)[0])[key_path])
    np.testing.assert_allclose(np.asarray(value, np.float32), want, rtol=1e-2, atol=1e-6)  # bf16 rounding only
  clips = transforms.normalize_clips(np.full((1, 4, 64, 64, 3), 100, np.uint8), jnp.float32)
  _, as_float32 = egoexo_jax.load_pretrained(str(tmp_path / "bf16"), dtype=jnp.float32)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  got, want = apply(as_float32, clips), apply(reference, clips)
  np.testing.assert_allclose(got["action"], want["action"], rtol=0.05, atol=0.05)


def test_cli_reads_the_recorded_config_and_writes_pyslowfast(trained_run, tmp_path):
  config, workdir = trained_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  (run / "config.json").write_text(config.to_json())
  environment = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "egoexo_jax.export", f"--workdir={run}", "--step=2", f"--output={tmp_path / 'out'}",
             "--noforward", "--pyslowfast"]
  result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout[result.stdout.index("{"):])
  assert summary["step"] == 2 and summary["state_bytes"] < summary["checkpoint_bytes"]
  card = pretrained.read_card(str(tmp_path / "out"))
  assert card["config_source"] == str(run / "config.json") and card["files"]["pyslowfast"]["left_out"] == []
  # Metrics of the exported step: the run's later scalars and evaluation do not count.
  assert card["metrics"]["final"] == {"train/loss": {"step": 2, "value": 2.0},
                                      "train/accuracy": {"step": 2, "value": 0.5}}
  assert sorted(os.listdir(tmp_path / "out")) == ["MODEL_CARD.md", "model_card.json", "pyslowfast.pyth", "state"]
  assert sorted(os.listdir(tmp_path)) == ["out", "run"]  # no temporary folder left

  with pytest.raises(FileExistsError, match="out exists"):
    export.export(str(run), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*checkpoints/3 \(steps there: \['2', '4'\]\)"):
    export.export(str(run), str(tmp_path / "out3"), step=3)
  other = tiny_config(config.data.train_records, **{"model.backbone_args.width": 4})
  with pytest.raises(pretrained.ExportMismatchError, match=r"config.json was made with model.backbone_args.width=8, "
                                                           r"the config has model.backbone_args.width=4"):
    export.export(str(run), str(tmp_path / "out4"), config=other)
