"""Clip sampling, crop geometry and box -> interaction-map rasterising, against hand-worked cases."""

import io

import numpy as np
import pytest
from PIL import Image

from egoexo_jax.input import transforms
from egoexo_jax.input.transforms import CropWindow


def full_window(width, height, size, flip=False):
  return CropWindow(0.0, 0.0, float(width), float(height), size, flip)


def box(frame, x1, y1, x2, y2, score):
  return [frame, x1, y1, x2, y2, score]


class TestBoxesToMap:
  # A 64x64 stored frame, cropped whole to 64x64, on a 1x2x2 grid: cells are 32x32 pixels.

  def rasterise(self, boxes, indices=(0,), grid=(1, 2, 2), window=None, height=64, width=64):
    window = window or full_window(width, height, 64)
    return transforms.boxes_to_map(np.asarray(boxes, np.float32).reshape(-1, 6), np.asarray(indices),
                                   height, width, window, grid)

  def test_small_box_marks_one_cell_with_its_score(self):
    out = self.rasterise([box(0, 0.1, 0.1, 0.3, 0.3, 0.9)])
    np.testing.assert_allclose(out[0], [[0.9, 0], [0, 0]])

  def test_box_across_the_middle_marks_every_cell_it_touches(self):
    out = self.rasterise([box(0, 0.25, 0.6, 0.75, 0.9, 0.7)])
    np.testing.assert_allclose(out[0], [[0, 0], [0.7, 0.7]])

  def test_scores_under_threshold_are_dropped(self):
    out = self.rasterise([box(0, 0.1, 0.1, 0.9, 0.9, 0.49)])
    assert not out.any()

  def test_overlapping_boxes_take_the_highest_score(self):
    out = self.rasterise([box(0, 0.0, 0.0, 0.9, 0.4, 0.6), box(0, 0.6, 0.1, 0.9, 0.3, 0.8)])
    np.testing.assert_allclose(out[0], [[0.6, 0.8], [0, 0]])

  def test_flip_mirrors_columns(self):
    window = full_window(64, 64, 64, flip=True)
    out = self.rasterise([box(0, 0.1, 0.6, 0.3, 0.9, 0.9)], window=window)
    np.testing.assert_allclose(out[0], [[0, 0], [0, 0.9]])

  def test_crop_offset_moves_boxes_and_drops_those_outside(self):
    # A 128x64 frame; the window is its right half, resampled to 64x64.
    window = CropWindow(64.0, 0.0, 128.0, 64.0, 64, False)
    inside = box(0, 0.8, 0.1, 0.9, 0.3, 0.9)  # x 102..115 px -> crop u 0.6..0.8 -> column 1
    outside = box(0, 0.1, 0.1, 0.3, 0.3, 0.95)  # x 13..38 px, left of the window
    out = self.rasterise([inside, outside], window=window, width=128)
    np.testing.assert_allclose(out[0], [[0, 0.9], [0, 0]])

  def test_box_partly_outside_is_clipped_to_the_border(self):
    window = CropWindow(64.0, 0.0, 128.0, 64.0, 64, False)
    out = self.rasterise([box(0, 0.4, 0.6, 0.6, 0.9, 0.9)], window=window, width=128)  # x 51..77 px
    np.testing.assert_allclose(out[0], [[0, 0], [0.9, 0]])

  def test_frames_map_to_time_steps_and_unsampled_frames_are_ignored(self):
    boxes = [box(8, 0.1, 0.1, 0.2, 0.2, 0.9), box(3, 0.6, 0.6, 0.9, 0.9, 0.9)]
    out = self.rasterise(boxes, indices=(0, 8), grid=(2, 2, 2))
    np.testing.assert_allclose(out[0], 0)
    np.testing.assert_allclose(out[1], [[0.9, 0], [0, 0]])

  def test_two_frames_per_time_step_pool_by_max(self):
    boxes = [box(0, 0.1, 0.1, 0.2, 0.2, 0.6), box(4, 0.1, 0.1, 0.2, 0.2, 0.7)]
    out = self.rasterise(boxes, indices=(0, 4, 8, 12), grid=(2, 2, 2))
    assert out[0, 0, 0] == pytest.approx(0.7) and not out[1].any()

  def test_no_boxes_give_zeros(self):
    assert not self.rasterise(np.zeros((0, 6))).any()
    assert transforms.boxes_to_map(None, np.arange(2), 64, 64, full_window(64, 64, 64), (2, 2, 2)).shape == (2, 2, 2)


def test_sample_frame_indices():
  rng = np.random.default_rng(0)
  starts = set()
  for _ in range(200):
    idx = transforms.sample_frame_indices(100, 8, 8, rng)
    np.testing.assert_array_equal(np.diff(idx), 8)
    assert 0 <= idx[0] <= 43 and idx[-1] <= 99
    starts.add(int(idx[0]))
  assert min(starts) == 0 and max(starts) == 43  # the whole range of starts is reachable
  np.testing.assert_array_equal(transforms.sample_frame_indices(100, 8, 8, None), 21 + 8 * np.arange(8))
  # Shorter than the span: the last frame repeats.
  np.testing.assert_array_equal(transforms.sample_frame_indices(20, 4, 8, None), [0, 8, 16, 19])


def test_evenly_spaced_clips_follow_pyslowfast():
  clips = transforms.evenly_spaced_clips(100, 8, 8, 2)  # span 57, delta 43: starts 0 and 21
  np.testing.assert_array_equal(clips[:, 0], [0, 21])
  np.testing.assert_array_equal(clips[1], 21 + 8 * np.arange(8))
  np.testing.assert_array_equal(transforms.evenly_spaced_clips(20, 4, 8, 3), [[0, 8, 16, 19]] * 3)
  assert transforms.evenly_spaced_clips(300, 8, 8, 10)[:, 0].tolist() == [243 * i // 10 for i in range(10)]


def test_crop_window_scale_jitter_and_bounds():
  rng = np.random.default_rng(1)
  sides = []
  for _ in range(300):
    w = transforms.sample_crop_window(240, 320, 224, 256, 320, rng)
    side = 224 / (w.x1 - w.x0) * 240  # output pixels of the short side
    sides.append(side)
    assert w.x0 >= -1e-6 and w.y0 >= -1e-6 and w.x1 <= 320 + 1e-6 and w.y1 <= 240 + 1e-6
    assert (w.x1 - w.x0) == pytest.approx(w.y1 - w.y0)
  assert 256 - 1e-6 <= min(sides) < 262 and 314 < max(sides) <= 320 + 1e-6
  centre = transforms.sample_crop_window(240, 320, 224, 256, 320, None)
  assert not centre.flip and (centre.x0 + centre.x1) / 2 == pytest.approx(160)
  assert centre.y1 - centre.y0 == pytest.approx(224 * 240 / 256)
  with pytest.raises(ValueError, match="smaller than the crop"):
    transforms.sample_crop_window(240, 320, 224, 200, 200, None)


def jpeg(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def test_decode_and_crop_resamples_the_window_and_flips():
  yy, xx = np.mgrid[0:64, 0:128]
  frame = np.stack([xx * 2, yy * 4, np.full_like(xx, 128)], -1).astype(np.uint8)
  frames = [jpeg(frame), jpeg(255 - frame)]
  window = CropWindow(64.0, 0.0, 128.0, 64.0, 32, False)
  out = transforms.decode_and_crop(frames, np.array([0, 1, 0]), window)
  assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
  expected = np.asarray(Image.fromarray(frame).resize((32, 32), Image.BILINEAR, box=(64, 0, 128, 64)))
  assert np.abs(out[0].astype(int) - expected).mean() < 3
  np.testing.assert_array_equal(out[0], out[2])
  flipped = transforms.decode_and_crop(frames, np.array([0]), CropWindow(64.0, 0.0, 128.0, 64.0, 32, True))
  np.testing.assert_array_equal(flipped[0], out[0][:, ::-1])


def test_normalize_clips():
  import jax.numpy as jnp
  clips = np.array([0, 115, 255], np.uint8)
  out = transforms.normalize_clips(clips, jnp.float32)
  np.testing.assert_allclose(out, (clips / 255.0 - 0.45) / 0.225, atol=1e-6)
