"""Object-Score teacher (Eq. 3-4): each formula against NumPy, end to end on real frames with a tiny
random teacher (passed explicitly, as only tests may), resume, and the CLI's refusal without weights."""

import csv
import io
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import DATA, decode_real_frames
from egoexo_jax.input import convert, records, sources
from egoexo_jax.models import resnet2d
from egoexo_jax.pseudo_labels import object_score

TEACHER = dict(stage_blocks=(1, 1, 1, 1), width=4, num_classes=7)
RESIZE, CROP, T, BATCH = 40, 32, 8, 5  # small stand-ins for 256, 224, 64, 64
SETTINGS = dict(num_frames=T, batch_size=BATCH, resize_short_side=RESIZE, crop_size=CROP, decode_threads=2)
LENGTHS = (20, 7, 13, 3)  # > T, < T, > T, < T frames


@pytest.fixture(scope="module")
def teacher():
  model = resnet2d.Model(**TEACHER)
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x))(jnp.zeros((1, CROP, CROP, 3)))
  return model, variables


@pytest.fixture(scope="module")
def per_frame_logits(teacher):
  """The same model on one frame at a time: uint8 (H, W, 3) -> float32 (K,) logits, computed apart."""
  model, variables = teacher
  apply = jax.jit(lambda x: model.apply(variables, x))
  mean, std = np.array(object_score.IMAGENET_MEAN), np.array(object_score.IMAGENET_STD)
  return lambda frame: np.asarray(apply(((frame / 255.0 - mean) / std)[None].astype(np.float32)))[0]


def jpeg(frame: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


@pytest.fixture(scope="module")
def record_file(tmp_path_factory):
  """Four records cut from real frames of data/clips/cup.mp4, of LENGTHS frames, as one TFRecord shard."""
  frames = [jpeg(f) for f in decode_real_frames("cup.mp4", sum(LENGTHS), 48)]
  height, width = decode_real_frames("cup.mp4", 1, 48)[0].shape[:2]
  path = tmp_path_factory.mktemp("records") / "cup.tfrecord-00000-of-00001"
  with open(path, "wb") as f:
    start = 0
    for i, length in enumerate(LENGTHS):
      record = records.VideoRecord(video_id=f"cup_{i}", fps=30.0, height=height, width=width,
                                   frames=frames[start:start + length], labels=np.array([1]))
      records.write_tfrecord(f, records.encode_example(record))
      start += length
  return str(path)


def reference_scores(record_file, per_frame_logits):
  """{video_id: NumPy mean of per-frame logits over the chosen frames}."""
  source = sources.open_records(record_file)
  expected = {}
  for i in range(len(source)):
    record = source[i]
    chosen = object_score.frame_indices(record.num_frames, T)
    logits = [per_frame_logits(object_score.preprocess_frame(record.frames[j], RESIZE, CROP)) for j in chosen]
    expected[record.video_id] = np.mean(np.stack(logits).astype(np.float64), axis=0)
  return expected


@pytest.fixture(scope="module")
def expected(record_file, per_frame_logits):
  return reference_scores(record_file, per_frame_logits)


# --------------------------------------------------------------------------- formulas


def test_frame_indices():
  np.testing.assert_array_equal(object_score.frame_indices(640), 5 + 10 * np.arange(64))  # segment centres
  np.testing.assert_array_equal(object_score.frame_indices(128), 1 + 2 * np.arange(64))
  np.testing.assert_array_equal(object_score.frame_indices(3, 2), [0, 2])
  np.testing.assert_array_equal(object_score.frame_indices(64), np.arange(64))
  np.testing.assert_array_equal(object_score.frame_indices(10), np.arange(10))  # shorter video: all frames
  np.testing.assert_array_equal(object_score.frame_indices(1), [0])
  for n in (65, 100, 127, 1000, 12345):
    chosen = object_score.frame_indices(n)
    assert len(chosen) == 64 and len(set(chosen.tolist())) == 64
    assert chosen[0] >= 0 and chosen[-1] <= n - 1 and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, [int((t + 0.5) * n / 64) for t in range(64)])
  with pytest.raises(ValueError):
    object_score.frame_indices(0)


def test_preprocessing_is_imagenet_eval_resize_crop_and_normalization():
  rng = np.random.default_rng(0)
  # Short side already at the resize size: no resampling, so the crop must be the exact centre.
  image = rng.integers(0, 256, size=(40, 71, 3), dtype=np.uint8)
  png = io.BytesIO()
  Image.fromarray(image).save(png, format="PNG")  # lossless, so the pixels are known
  out = object_score.preprocess_frame(png.getvalue(), 40, 32)
  left = int(round((71 - 32) / 2))  # torchvision CenterCrop: 20 (round half to even of 19.5)
  np.testing.assert_array_equal(out, image[4:36, left:left + 32])
  # Portrait, resized: short side 40, long side int(40 * 90 / 50) = 72, then the centre 32 x 32.
  image = rng.integers(0, 256, size=(90, 50, 3), dtype=np.uint8)
  png = io.BytesIO()
  Image.fromarray(image).save(png, format="PNG")
  resized = np.asarray(Image.fromarray(image).resize((40, 72), Image.BILINEAR))
  np.testing.assert_array_equal(object_score.preprocess_frame(png.getvalue(), 40, 32), resized[20:52, 4:36])
  assert object_score.preprocess_frame(jpeg(image), 256, 224).shape == (224, 224, 3)

  pixels = rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8)
  expected = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(np.asarray(object_score.normalize(jnp.asarray(pixels))), expected, atol=1e-6)


def test_averaged_logits_equal_numpy_mean_of_per_frame_logits(teacher, per_frame_logits):
  frames = np.stack([object_score.preprocess_frame(jpeg(f), RESIZE, CROP)
                     for f in decode_real_frames("cup.mp4", 11, 48)])
  classify = object_score.make_classifier(*teacher)
  expected = np.mean([per_frame_logits(frame) for frame in frames], axis=0)
  for batch_size in (4, 11, 16):  # padded last batch; one exact batch; one padded batch
    averaged = object_score.average_logits(classify, frames, batch_size)
    assert averaged.shape == (TEACHER["num_classes"],) and averaged.dtype == np.float32
    np.testing.assert_allclose(averaged, expected, rtol=0, atol=1e-5)


def test_temperature_softmax_against_numpy():
  logits = np.random.default_rng(0).normal(scale=3.0, size=(3, 1000)).astype(np.float32)
  for beta in (0.5, 1.0, 4.0):
    z = np.exp(logits.astype(np.float64) / beta)
    np.testing.assert_allclose(object_score.object_scores(logits, beta), z / z.sum(-1, keepdims=True),
                               rtol=1e-5, atol=1e-8)
  big = object_score.object_scores(np.array([1000.0, 0.0, -1000.0]), 1.0)  # no overflow
  np.testing.assert_allclose(big, [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="temperature"):
    object_score.object_scores(logits, 0.0)


# --------------------------------------------------------------------------- end to end


def test_end_to_end_on_real_frames(tmp_path, record_file, teacher, expected):
  source = sources.open_records(record_file)
  scores = object_score.score_records(source, *teacher, partial_output=str(tmp_path / "out.pkl.partial"),
                                      **SETTINGS)
  assert list(scores) == ["cup_0", "cup_1", "cup_2", "cup_3"]
  for video_id, value in scores.items():
    assert value.shape == (TEACHER["num_classes"],) and value.dtype == np.float32
    np.testing.assert_allclose(value, expected[video_id], rtol=0, atol=1e-5)

  output, probabilities = str(tmp_path / "out.pkl"), str(tmp_path / "probs.pkl")
  object_score.write_outputs(scores, output, probabilities_output=probabilities, temperature=2.0)
  loaded = convert.load_logits(output, "object_logits")  # what the converter reads
  assert sorted(loaded) == sorted(scores)
  with open(probabilities, "rb") as f:
    probs = pickle.load(f)
  for video_id, value in scores.items():
    np.testing.assert_array_equal(loaded[video_id], value)
    np.testing.assert_allclose(probs[video_id], object_score.object_scores(value, 2.0), rtol=1e-6)
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]  # atomic writes leave no temporaries


def test_resume_scores_only_the_missing_ids(tmp_path, record_file, teacher, expected):
  source = sources.open_records(record_file)
  partial = str(tmp_path / "out.pkl.partial")
  settings = dict(num_frames=T, resize_short_side=RESIZE, crop_size=CROP)
  sentinel = np.full(TEACHER["num_classes"], 123.0, np.float32)  # never a real score
  with open(partial, "wb") as f:  # a header, two saves, then a save torn by a crash
    pickle.dump({"format": object_score.PARTIAL_FORMAT, "settings": settings}, f)
    pickle.dump({"cup_0": sentinel, "gone": sentinel}, f)
    pickle.dump({"cup_2": sentinel}, f)
    f.write(pickle.dumps({"cup_1": sentinel})[:-9])
  scores = object_score.score_records(source, *teacher, partial_output=partial, save_every=1, **SETTINGS)
  assert list(scores) == ["cup_0", "cup_1", "cup_2", "cup_3"]  # only the records' ids, in record order
  for video_id in ("cup_0", "cup_2"):  # reused, not recomputed
    np.testing.assert_array_equal(scores[video_id], sentinel)
  for video_id in ("cup_1", "cup_3"):  # cup_1's torn save was dropped: scored again
    np.testing.assert_allclose(scores[video_id], expected[video_id], rtol=0, atol=1e-5)
  saved = object_score.load_partial(partial, settings)
  assert set(saved) == {"cup_0", "cup_1", "cup_2", "cup_3", "gone"}
  np.testing.assert_array_equal(saved["cup_1"], scores["cup_1"])

  with pytest.raises(object_score.ObjectScoreError, match=r"other settings \(num_frames: 8 there, 4 now\)"):
    object_score.score_records(source, *teacher, partial_output=partial, **dict(SETTINGS, num_frames=4))


def test_a_bad_record_names_itself_and_keeps_earlier_scores(tmp_path, record_file, teacher):
  source = sources.open_records(record_file)

  def shard(name, last):
    path = tmp_path / f"{name}.tfrecord-00000-of-00001"
    with open(path, "wb") as f:
      for record in (source[0], source[1], last):
        records.write_tfrecord(f, records.encode_example(record))
    return sources.open_records(str(path))

  bad = source[2]
  broken = int(object_score.frame_indices(bad.num_frames, T)[3])
  bad.frames[broken] = b"not a jpeg"
  partial = str(tmp_path / "out.pkl.partial")
  with pytest.raises(object_score.ObjectScoreError,
                     match=rf"bad\.tfrecord-00000-of-00001#2 \('cup_2'\): frame {broken}: cannot decode"):
    object_score.score_records(shard("bad", bad), *teacher, partial_output=partial, **SETTINGS)
  saved = object_score.load_partial(partial, dict(num_frames=T, resize_short_side=RESIZE, crop_size=CROP))
  assert set(saved) == {"cup_0", "cup_1"}  # saved on the way out, for the restart

  duplicate = source[3]
  duplicate.video_id = "cup_0"
  with pytest.raises(object_score.ObjectScoreError, match=r"#2: video_id 'cup_0' was already used by .*#0"):
    object_score.score_records(shard("duplicate", duplicate), *teacher, **SETTINGS)
  with pytest.raises(object_score.ObjectScoreError, match="'cup_0' is not in the manifest"):
    object_score.score_records(source, *teacher, known_ids={"cup_1"}, **SETTINGS)


def test_manifest_with_segments_sharing_a_path_is_refused():
  with pytest.raises(object_score.ObjectScoreError, match=r"'clips/box\.mp4'.*Run without --manifest"):
    object_score.manifest_paths(str(DATA / "manifest.csv"))


# --------------------------------------------------------------------------- command line


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "egoexo_jax.pseudo_labels.object_score", *args],
                        cwd=DATA.parent, capture_output=True, text=True, timeout=120)


def test_cli_without_weights_refuses_plainly(tmp_path, record_file):
  output = tmp_path / "out.pkl"
  for weights in ([], [f"--weights={tmp_path / 'missing.pth'}"]):
    result = run_cli(f"--records={record_file}", f"--output={output}", *weights)
    assert result.returncode != 0
    assert "No ImageNet classifier weights are available offline in this environment" in result.stderr
    assert "refuses to produce Object-Scores from random weights" in result.stderr
    assert "https://download.pytorch.org/models/resnet152-394f9c45.pth" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists() and not (tmp_path / "out.pkl.partial").exists()


def torchvision_state_dict(variables) -> dict:
  """Flax variables -> torchvision names and layouts (the inverse of the documented mapping)."""
  import torch  # pylint: disable=g-import-not-at-top

  names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var", "kernel": "weight"}
  state = {}
  for collection in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      keys = [k.key for k in path]
      value = np.asarray(value)
      if keys[-1] == "kernel":
        value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
      module = ".".join(k.replace("_", ".").replace("downsample.conv", "downsample.0")
                        .replace("downsample.bn", "downsample.1") for k in keys[:-1])
      state[f"{module}.{names[keys[-1]]}"] = torch.from_numpy(np.array(value, copy=True))
  return state


def test_cli_with_a_weights_file_and_manifest(tmp_path, record_file, teacher, expected):
  import torch  # pylint: disable=g-import-not-at-top

  weights = tmp_path / "tiny_resnet.pth"
  torch.save(torchvision_state_dict(teacher[1]), weights)
  manifest = tmp_path / "videos.csv"
  with open(manifest, "w", newline="") as f:
    csv.writer(f).writerows([("path", "labels", "video_id")] + [(f"videos/v{i}.mp4", "1", f"cup_{i}")
                                                                for i in range(4)])
  output, probabilities = tmp_path / "out.pkl", tmp_path / "probs.pkl"
  result = run_cli(f"--records={record_file}", f"--output={output}", f"--weights={weights}", f"--manifest={manifest}",
                   f"--probabilities_output={probabilities}", "--temperature=0.5", f"--num_frames={T}",
                   f"--batch_size={BATCH}", f"--resize_short_side={RESIZE}", f"--crop_size={CROP}",
                   "--decode_threads=2", "--save_every=2")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(output, "rb") as f:
    scores = pickle.load(f)
  with open(probabilities, "rb") as f:
    probs = pickle.load(f)
  assert sorted(scores) == [f"videos/v{i}.mp4" for i in range(4)]
  for i in range(4):
    np.testing.assert_allclose(scores[f"videos/v{i}.mp4"], expected[f"cup_{i}"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(probs[f"videos/v{i}.mp4"], object_score.object_scores(scores[f"videos/v{i}.mp4"], 0.5),
                               rtol=1e-6)
  assert not (tmp_path / "out.pkl.partial").exists()  # removed once the final file is in place
