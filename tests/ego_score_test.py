"""Ego-Score teacher: batched scoring equals per-clip scoring; train -> score -> convert end to end."""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from egoexo_jax.input import convert, sources, transforms
from egoexo_jax import objectives
from egoexo_jax.pseudo_labels import ego_score

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_batched_scores_equal_the_mean_of_per_clip_logits(real_record_pattern):
  config = tiny_config(real_record_pattern, **{"model.num_classes": {"action": 2}, "model.use_ego_heads": False})
  model = objectives.resolve(config).model
  clips = np.zeros((1, 4, 64, 64, 3), np.float32)
  variables = model.init(jax.random.key(3), clips, train=False)
  logits_fn = ego_score.make_logits_fn(model, variables, jnp.float32)
  source = sources.open_records(real_record_pattern)
  recs = [source[i] for i in range(len(source))]
  # 6 videos x 2 clips in batches of 5: videos straddle batches and the last batch is padded.
  done = {"real_1": np.array([9.0, -9.0], np.float32)}  # already scored: kept, not recomputed
  saved = []
  scores = ego_score.score_records(recs, logits_fn, config, num_clips=2, batch_size=5, done=done,
                                   checkpoint=saved.append, save_every=2)
  assert sorted(scores) == [f"real_{i}" for i in range(6)]
  np.testing.assert_array_equal(scores["real_1"], [9.0, -9.0])
  for rec in recs:
    if rec.video_id == "real_1":
      continue
    test_clips = ego_score.test_clips(rec, config, 2)
    assert test_clips.shape == (2, 4, 64, 64, 3)
    per_clip = [model.apply(variables, transforms.normalize_clips(c[None], jnp.float32), train=False)["action"][0]
                for c in test_clips]
    np.testing.assert_allclose(scores[rec.video_id], np.mean(per_clip, axis=0), rtol=1e-5, atol=1e-6)
  assert len(saved) == 2 and all(isinstance(v, np.ndarray) for s in saved for v in s.values())


def run(args, tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


TINY = ["--config.num_train_steps=2", "--config.optimizer.warmup_steps=1", "--config.checkpoint_every_steps=2",
        "--config.data.convert_short_side=72", "--config.data.crop_size=64", "--config.data.min_short_side=64",
        "--config.data.max_short_side=72", "--config.data.clip_length=4", "--config.data.frame_stride=2",
        "--config.model.backbone_args.width=8"]


def test_train_classifier_score_and_convert_with_the_scores(tmp_path):
  workdir = tmp_path / "ego_cls"
  run(["main.py", "--config=configs/ego_classifier.py:small", f"--workdir={workdir}", *TINY], tmp_path)
  output = tmp_path / "ego_logits.pkl"
  # The trainer saved its config: --workdir alone names the classifier.
  assert json.loads((workdir / "config.json").read_text())["model"]["backbone_args"]["width"] == 8
  result = run(["-m", "egoexo_jax.pseudo_labels.ego_score", f"--workdir={workdir}",
                f"--records={workdir}/records/train.tfrecord-*", f"--output={output}",
                f"--probabilities_output={tmp_path / 'ego_probs.pkl'}"], tmp_path)
  assert "scored 17 videos" in result.stdout
  scores = pickle.loads(output.read_bytes())
  probabilities = pickle.loads((tmp_path / "ego_probs.pkl").read_bytes())
  assert len(scores) == 17 and all(v.shape == (2,) and np.isfinite(v).all() for v in scores.values())
  np.testing.assert_allclose(probabilities["box_00"], jax.nn.softmax(scores["box_00"]), rtol=1e-6)
  assert not os.path.exists(str(output) + ".partial")
  # The scores feed the converter (keyed by video_id), landing in the records' ego_logits field.
  report = convert.convert_manifest(str(ROOT / "data" / "manifest.csv"), str(tmp_path / "rec" / "train"),
                                    short_side=72, ego_logits=str(output))
  assert report.written == 17
  converted = sources.open_records(str(tmp_path / "rec" / "train.tfrecord-*"))
  for i in range(len(converted)):
    record = converted[i]
    np.testing.assert_array_equal(record.ego_logits, scores[record.video_id])
