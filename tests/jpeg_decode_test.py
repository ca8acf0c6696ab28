"""The fast clip decoder (input/jpeg_decode.py) against a NumPy bilinear formula and against the exact
Pillow path on real frames of the shipped clips."""

import io

import numpy as np
import PIL
import pytest
from PIL import Image

from conftest import decode_real_frames
from testlib import bilinear, jpeg
from egoexo_jax.input import jpeg_decode, transforms
from egoexo_jax.input.transforms import CropWindow


@pytest.fixture(scope="module")
def real_frames():
  """(stored frames, their q90 JPEGs): 6 frames of two shipped clips at short side 256, as records hold them."""
  frames = decode_real_frames("box.mp4", 3, 256) + decode_real_frames("bikes.mp4", 3, 256)
  return frames, [jpeg(f) for f in frames]


def test_decoded_frames_are_pillows():
  # simplejpeg and Pillow run libjpeg-turbo with the same settings: a full-size window at 1:1 is the decode.
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
  data = jpeg(frame)
  window = CropWindow(0.0, 0.0, 48.0, 48.0, 48, False)
  out = transforms.decode_and_crop([data], np.array([0]), window, decoder="fast")
  np.testing.assert_array_equal(out[0], np.asarray(Image.open(io.BytesIO(data)))[:, :48])


@pytest.mark.parametrize("flip", [False, True])
def test_magnified_window_is_bilinear_interpolation(flip, real_frames):
  data = real_frames[1][0]  # 341 x 256
  decoded = np.asarray(Image.open(io.BytesIO(data)))
  # a sub-pixel window partly off the frame's right edge, magnified 1.6x
  window = CropWindow(300.3, 7.7, 345.3, 52.7, 72, flip)
  out = transforms.decode_and_crop([data], np.array([0]), window, decoder="fast")[0]
  expected = bilinear(decoded, window)
  # OpenCV places samples on a 1/32-pixel grid and rounds: off by at most |neighbour step| / 64 + 1/2 per axis
  assert np.abs(out - expected).max() <= 255 / 32 + 1
  assert np.abs(out - expected).mean() < 0.6


def test_fast_matches_exact_on_real_training_clips(real_frames):
  """The R50 training transform (224 crop, short side 256-320 of frames stored at 256: magnified):
  per pixel the two paths differ by the rounding of their bilinear arithmetic, far less than JPEG
  itself moved the pixels at the converter's quality, and the channel statistics that normalisation
  and the model see are equal."""
  frames, jpegs = real_frames
  rng = np.random.default_rng(2)
  exact, fast, jpeg_error = [], [], []
  for start in (0, 3):  # each clip's frames, one window per clip
    height, width = frames[start].shape[:2]
    window = transforms.sample_crop_window(height, width, 224, 256, 320, rng)
    indices = np.array([start, start + 1, start + 2, start + 1])  # a repeated frame too
    exact.append(transforms.decode_and_crop(jpegs, indices, window, decoder="exact").astype(np.float64))
    fast.append(transforms.decode_and_crop(jpegs, indices, window, decoder="fast").astype(np.float64))
    jpeg_error.append(np.abs(exact[-1] - _exact_without_jpeg(frames, indices, window)).mean())
  exact, fast = np.concatenate(exact), np.concatenate(fast)
  difference = np.abs(exact - fast).mean()
  assert difference < 0.5, difference
  assert difference < 0.5 * np.mean(jpeg_error), (difference, jpeg_error)
  assert np.abs(exact - fast).max() <= 8
  np.testing.assert_allclose(fast.reshape(-1, 3).mean(0), exact.reshape(-1, 3).mean(0), atol=0.1)
  np.testing.assert_allclose(fast.reshape(-1, 3).std(0), exact.reshape(-1, 3).std(0), atol=0.1)


def _exact_without_jpeg(frames, indices, window):
  """Pillow's resize of the stored frames themselves (no JPEG): what JPEG coding costs the exact path."""
  box = (window.x0, window.y0, window.x1, window.y1)
  out = np.stack([np.asarray(Image.fromarray(frames[i]).resize((window.size,) * 2, Image.BILINEAR, box=box))
                  for i in indices]).astype(np.float64)
  return out[:, :, ::-1] if window.flip else out


def test_minified_windows_decode_at_reduced_dct_scale(real_frames):
  """A 56 crop from short side 64-80 of frames stored at 256 (window 179-224 stored pixels): decoded at
  1/2 or 1/4 scale, then Pillow's antialiased resize; close to the exact path, statistics equal."""
  frames, jpegs = real_frames
  rng = np.random.default_rng(3)
  height, width = frames[0].shape[:2]
  window = transforms.sample_crop_window(height, width, 56, 64, 80, rng)
  assert jpeg_decode.dct_reduction(height, width, window) in (2, 4)
  exact = transforms.decode_and_crop(jpegs, np.arange(3), window, decoder="exact").astype(np.float64)
  fast = transforms.decode_and_crop(jpegs, np.arange(3), window, decoder="fast").astype(np.float64)
  assert np.abs(exact - fast).mean() < 2.0
  np.testing.assert_allclose(fast.reshape(-1, 3).mean(0), exact.reshape(-1, 3).mean(0), atol=0.5)
  np.testing.assert_allclose(fast.reshape(-1, 3).std(0), exact.reshape(-1, 3).std(0), atol=0.5)


def test_minified_window_without_reduction_is_the_exact_path(real_frames):
  # 112 crop from short side 144 of frames stored at 256: a 199-pixel window, too small to halve (99.5 < 112),
  # so Pillow's resize runs on the full decode, which is Pillow's own: the same output bit for bit.
  frames, jpegs = real_frames
  height, width = frames[0].shape[:2]
  window = transforms.sample_crop_window(height, width, 112, 144, 144, None)
  assert jpeg_decode.dct_reduction(height, width, window) == 1
  np.testing.assert_array_equal(transforms.decode_and_crop(jpegs, np.arange(3), window, decoder="fast"),
                                transforms.decode_and_crop(jpegs, np.arange(3), window, decoder="exact"))


def test_dct_reduction_keeps_the_window_at_least_output_size():
  window = lambda w, size: CropWindow(0.0, 0.0, float(w), float(w), size, False)  # noqa: E731
  assert jpeg_decode.dct_reduction(256, 341, window(224, 224)) == 1
  assert jpeg_decode.dct_reduction(256, 341, window(224, 112)) == 2
  assert jpeg_decode.dct_reduction(256, 341, window(223, 112)) == 1
  assert jpeg_decode.dct_reduction(256, 341, window(256, 56)) == 4
  assert jpeg_decode.dct_reduction(256, 341, window(256, 32)) == 8


def test_errors_are_the_ones_the_pipeline_skips():
  window = CropWindow(0.0, 0.0, 8.0, 8.0, 8, False)
  with pytest.raises(PIL.UnidentifiedImageError):
    transforms.decode_and_crop([b"\xff\xd8 not a jpeg"], np.array([0]), window, decoder="fast")
  data = jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8))
  with pytest.raises(OSError, match="corrupt JPEG frame"):
    transforms.decode_and_crop([data[:len(data) // 2]], np.array([0]), window, decoder="fast")
  with pytest.raises(ValueError, match="unknown decoder 'turbo'"):
    transforms.decode_and_crop([data], np.array([0]), window, decoder="turbo")
