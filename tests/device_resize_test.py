"""Resizing on the accelerator (input/device_resize.py): host patches + the jitted resize against a NumPy
bilinear formula on the whole decoded frame, against the host paths on real frames, and through the pipeline
and the trainer's model application."""

import io

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import decode_real_frames, tiny_config
from testlib import bilinear, jpeg
from egoexo_jax import objectives, train
from egoexo_jax.input import device_resize, egoexo_pipeline, transforms
from egoexo_jax.input.transforms import CropWindow

GRID = (4, 2, 2)  # the interaction-map grid of tiny_config's model (the input layer alone is under test)


@pytest.fixture(scope="module")
def real_frames():
  """(stored frames, their q75 JPEGs): 3 frames of each of two shipped clips at short side 256."""
  frames = decode_real_frames("box.mp4", 3, 256) + decode_real_frames("bikes.mp4", 3, 256)
  return frames, [jpeg(f, quality=75) for f in frames]


def on_device(jpegs, indices, window):
  """The device path for one clip: host patch, then resize_clips as the trainer runs it (jitted)."""
  patch, patch_window = device_resize.decode_patch(jpegs, indices, window)
  resize = jax.jit(device_resize.resize_clips, static_argnums=2)
  return np.asarray(resize(patch[None], patch_window[None], window.size))[0]


def decoded(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("flip", [False, True])
def test_patch_resize_is_bilinear_interpolation_of_the_frame(flip, real_frames):
  """Windows of the R50 transform on 341x256 frames, including ones touching each edge of the frame:
  the result is the frame's exact bilinear interpolation (edge pixels repeated), rounded once."""
  data = real_frames[1][0]
  frame = decoded(data)
  height, width = frame.shape[:2]
  windows = [CropWindow(0.0, 0.0, 224.0, 224.0, 224, flip),  # top-left corner, 1:1
             CropWindow(width - 190.3, height - 190.3, width, height, 224, flip),  # bottom-right corner, magnified
             CropWindow(37.25, 11.8, 37.25 + 201.6, 11.8 + 201.6, 224, flip)]  # inside, fractional origin
  rng = np.random.default_rng(0)
  windows += [transforms.sample_crop_window(height, width, 224, 256, 320, rng) for _ in range(3)]
  for window in windows:
    window = CropWindow(window.x0, window.y0, window.x1, window.y1, 224, flip)
    out = on_device([data], np.array([0]), window)[0].astype(np.float64)
    expected = bilinear(frame, window)
    assert np.abs(out - expected).max() <= 0.5 + 1e-3, window  # float32 arithmetic, one rounding
    assert out.shape == (224, 224, 3)


def test_frames_smaller_than_the_patch_repeat_their_edges():
  """A 50x40 frame and a 64 crop (patch 66): the window magnifies the whole frame or a part touching its
  edges; the patch repeats the last rows and columns, and the result is still the frame's interpolation."""
  rng = np.random.default_rng(4)
  frame = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)).resize((50, 40)))
  data = jpeg(frame)
  for window in (CropWindow(0.0, 0.0, 40.0, 40.0, 64, False), CropWindow(13.7, 2.2, 50.0, 38.5, 64, True)):
    patch, _ = device_resize.decode_patch([data], np.array([0]), window)
    assert patch.shape == (1, 66, 66, 3)
    np.testing.assert_array_equal(patch[0, 40:], np.broadcast_to(patch[0, 39:40], (26, 66, 3)))
    np.testing.assert_array_equal(patch[0, :, 50:], np.broadcast_to(patch[0, :, 49:50], (66, 16, 3)))
    out = on_device([data], np.array([0]), window)[0].astype(np.float64)
    assert np.abs(out - bilinear(decoded(data), window)).max() <= 0.5 + 1e-3


def test_device_matches_the_host_paths_on_real_training_clips(real_frames):
  """The R50 training transform on records at short side 256 (224 crops of windows magnified 1-1.25x,
  flips): the device path is within the host fast path's own rounding of the exact Pillow path, and the
  channel statistics the model sees are equal."""
  frames, jpegs = real_frames
  rng = np.random.default_rng(2)
  exact, host, device = [], [], []
  for start in (0, 3):
    height, width = frames[start].shape[:2]
    for _ in range(3):
      window = transforms.sample_crop_window(height, width, 224, 256, 320, rng)
      indices = np.array([start, start + 1, start + 2, start + 1])  # a repeated frame too
      exact.append(transforms.decode_and_crop(jpegs, indices, window, decoder="exact").astype(np.float64))
      host.append(transforms.decode_and_crop(jpegs, indices, window, decoder="fast").astype(np.float64))
      device.append(on_device(jpegs, indices, window).astype(np.float64))
  exact, host, device = (np.concatenate(x) for x in (exact, host, device))
  assert np.abs(device - exact).mean() < 0.5 and np.abs(device - exact).max() <= 8
  assert np.abs(device - host).mean() < 0.5
  for clips in (device, host):
    np.testing.assert_allclose(clips.reshape(-1, 3).mean(0), exact.reshape(-1, 3).mean(0), atol=0.1)
    np.testing.assert_allclose(clips.reshape(-1, 3).std(0), exact.reshape(-1, 3).std(0), atol=0.1)


def test_wide_and_non_jpeg_windows_are_resized_on_the_host(real_frames):
  """A window wider than the crop (minified; antialiasing needed) and PNG frames: the host's clip, sent
  as the patch's top-left with the identity window, comes through the device resize unchanged."""
  frames, jpegs = real_frames
  height, width = frames[0].shape[:2]
  wide = transforms.sample_crop_window(height, width, 112, 128, 160, np.random.default_rng(1))
  pngs = []
  for frame in frames[:3]:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
  magnified = transforms.sample_crop_window(height, width, 112, 256, 320, np.random.default_rng(1))
  for data, window in ((jpegs, wide), (pngs, magnified)):
    patch, patch_window = device_resize.decode_patch(data, np.arange(3), window)
    np.testing.assert_array_equal(patch_window, [0, 0, 112, 112, 0])
    host = transforms.decode_and_crop(data, np.arange(3), window, decoder="fast")
    np.testing.assert_array_equal(on_device(data, np.arange(3), window), host)


def test_patch_is_crop_plus_two_and_covers_every_tap(real_frames):
  frames, jpegs = real_frames
  height, width = frames[0].shape[:2]
  window = CropWindow(100.6, 20.4, 100.6 + 223.9, 20.4 + 223.9, 224, False)
  patch, patch_window = device_resize.decode_patch(jpegs, np.arange(2), window)
  assert patch.shape == (2, 226, 226, 3) and device_resize.patch_size(224) == 226
  # Origin floor(x0 - 0.5) = 100, floor(y0 - 0.5) = 19: the patch is the decoded frame there.
  np.testing.assert_array_equal(patch[1], decoded(jpegs[1])[19:19 + 226, 100:100 + 226])
  np.testing.assert_allclose(patch_window, [0.6, 1.4, 224.5, 225.3, 0.0], atol=1e-4)


def test_auto_resizes_on_the_host_on_a_cpu_backend(real_record_pattern):
  assert jax.default_backend() == "cpu"  # the suite's 8 fake CPU devices
  assert device_resize.resolve("auto") == "host" and device_resize.resolve("device") == "device"
  with pytest.raises(ValueError, match="unknown config data.resize 'gpu'"):
    device_resize.resolve("gpu")
  batch = next(iter(egoexo_pipeline.make_train_dataset(tiny_config(real_record_pattern), real_record_pattern,
                                                                grid=GRID)))
  assert "clips_window" not in batch and batch["clips"].shape[2:4] == (64, 64)


def test_resize_batch_resizes_windowed_keys_only():
  rng = np.random.default_rng(0)
  patches = rng.integers(0, 256, (2, 3, 10, 10, 3)).astype(np.uint8)
  windows = np.array([[1, 1, 9, 9, 0], [0, 0, 8, 8, 1]], np.float32)
  batch = {"ego_clips": patches, "ego_clips_window": windows, "exo_clips": patches[:, :, :8, :8],
           "labels": np.arange(2)}
  out = device_resize.resize_batch(batch, 8)
  assert set(out) == {"ego_clips", "exo_clips", "labels"} and out["ego_clips"].shape == (2, 3, 8, 8, 3)
  np.testing.assert_array_equal(out["ego_clips"][0], patches[0, :, 1:9, 1:9])  # a 1:1 window is a copy
  np.testing.assert_array_equal(out["ego_clips"][1], patches[1, :, :8, 7::-1])  # ... flipped
  assert out["exo_clips"] is batch["exo_clips"] and out["labels"] is batch["labels"]
  assert device_resize.resize_batch({"clips": patches}, None)["clips"] is patches
  with pytest.raises(ValueError, match="patches of 10x10 pixels, but config data.crop_size 16 sends 18x18"):
    device_resize.resize_batch(batch, 16)
  with pytest.raises(ValueError, match="no data.crop_size"):
    device_resize.resize_batch(batch, None)


def test_pipeline_batches_resized_by_the_trainer_match_the_host_resize(real_record_pattern):
  """The same draws with data.resize 'device' and 'host': after the trainer's resize the clips agree within
  rounding and every other key is identical."""
  batches = {}
  for resize in ("device", "host"):
    config = tiny_config(real_record_pattern, **{"data.resize": resize})
    batches[resize] = next(iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID)))
  device, host = batches["device"], batches["host"]
  assert device["clips"].shape[2:4] == (66, 66) and host["clips"].shape[2:4] == (64, 64)
  resized = np.asarray(device_resize.resize_batch(device, 64)["clips"]).astype(np.float64)
  assert np.abs(resized - host["clips"]).mean() < 0.5 and np.abs(resized - host["clips"]).max() <= 8
  for key in set(host) - {"clips"}:
    np.testing.assert_array_equal(device[key], host[key], err_msg=key)


class Echo(nn.Module):
  """Returns what the trainer gives the model: its inputs after the resize and the normalisation."""

  @nn.compact
  def __call__(self, clips, train=False):
    return {"clips": clips}


def test_apply_model_resizes_patches(real_record_pattern):
  """train.apply_model resizes a device-resize batch's patches before the model sees them: the model's input
  is the normalised clip of resize_batch, of the configured crop size."""
  config = tiny_config(real_record_pattern, **{"data.resize": "device"})
  dataset = egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID)
  batch, _ = train.split_host_keys(next(iter(dataset)))
  assert "clips_window" in batch
  objective = objectives.Objective(name="echo", model=Echo(), make_dataset=None, example_batch=None,
                                   model_inputs=lambda b: (b["clips"],), loss=None)
  outputs, _ = train.apply_model(objective, {}, {}, batch, config=config, rng=jax.random.key(1))
  expected = transforms.normalize_clips(device_resize.resize_batch(batch, config.data.crop_size)["clips"],
                                        jax.numpy.dtype(config.model.dtype))
  assert outputs["clips"].shape[2:4] == (config.data.crop_size,) * 2
  np.testing.assert_array_equal(outputs["clips"], expected)
