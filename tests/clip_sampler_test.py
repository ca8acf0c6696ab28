"""The one clip sampler and box rasterizer (input/clip_sampler.py) against hand-worked clips and maps."""

import io

import numpy as np
import pytest
from PIL import Image

from egoexo_jax.input import clip_sampler, egoexo_pipeline, finetune_pipeline, records, stream, suml_pipeline
from egoexo_jax.input.transforms import CropWindow


def frame_coded_record(num_frames=20, height=32, width=48, **fields):
  """Frames of one flat grey level each: 10 x the frame index (PNG, so the levels survive decoding)."""
  frames = []
  for t in range(num_frames):
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 10 * t, np.uint8)).save(buffer, format="PNG")
    frames.append(buffer.getvalue())
  return records.VideoRecord(video_id="v", fps=10.0, height=height, width=width, frames=frames,
                             labels=np.array([1]), **fields)


def test_centre_clip_takes_every_stride_th_frame_around_the_middle():
  sampler = clip_sampler.ClipSampler(clip_length=4, frame_stride=3, crop_size=16, min_short_side=16,
                                     max_short_side=24)
  clip = sampler.sample(frame_coded_record(), None)
  # span (4 - 1) 3 + 1 = 10 of 20 frames: slack 10, start 5: frames 5, 8, 11, 14
  assert clip.indices.tolist() == [5, 8, 11, 14]
  assert clip.pixels.shape == (4, 16, 16, 3) and clip.pixels.dtype == np.uint8
  np.testing.assert_array_equal(clip.pixels[:, 0, 0, 0], [50, 80, 110, 140])
  # short side 16 of 32: scale 1/2, the 24 x 16 frame's centre 16 x 16 square is stored x 8..40
  assert (clip.window.x0, clip.window.x1, clip.window.y0, clip.window.y1, clip.window.flip) == (8, 40, 0, 32, False)
  np.testing.assert_array_equal(sampler(frame_coded_record(), None), clip.pixels)
  # A video shorter than the clip repeats its last frame.
  assert sampler.sample(frame_coded_record(num_frames=6), None).indices.tolist() == [0, 3, 5, 5]


def test_every_pipeline_draws_the_same_clip_from_the_same_rng():
  sampler = clip_sampler.ClipSampler(clip_length=4, frame_stride=2, crop_size=16, min_short_side=16,
                                     max_short_side=24)
  record = frame_coded_record()
  expected = sampler(record, np.random.default_rng(3))
  heads = (("action", 3),)
  pipelines = [egoexo_pipeline.EgoExoTrainTransform(heads, 10, clip=sampler).random_map(
                   record, np.random.default_rng(3)),
               finetune_pipeline.FinetuneTrainTransform(heads, "single", clip=sampler).random_map(
                   record, np.random.default_rng(3)),
               suml_pipeline.ExoTrainTransform(sampler, heads).random_map(record, np.random.default_rng(3))]
  for clips in (pipelines[0]["clips"], pipelines[1]["clips"], pipelines[2]["exo_clips"]):
    np.testing.assert_array_equal(clips, expected)


def test_boxes_become_hand_and_object_maps_through_the_window_and_flip():
  boxes = np.array([[0, 0.0, 0.0, 0.4, 0.4, 0.8],   # frame 0: top-left quarter of a 2 x 2 grid
                    [1, 0.6, 0.6, 0.9, 0.9, 0.7],   # frame 1: bottom-right
                    [1, 0.0, 0.0, 0.9, 0.9, 0.2]],  # under the 0.5 threshold: dropped
                   np.float32)
  record = frame_coded_record(num_frames=2, height=10, width=10, hand_boxes=boxes)
  clip = clip_sampler.Clip(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), CropWindow(0, 0, 10, 10, 4, False))
  out = clip_sampler.BoxRasterizer(grid=(2, 2, 2))(record, clip)
  hands = np.zeros((2, 2, 2), np.float32)
  hands[0, 0, 0], hands[1, 1, 1] = 0.8, 0.7
  np.testing.assert_array_equal(out["interaction_map"][..., 0], hands)
  np.testing.assert_array_equal(out["interaction_map"][..., 1], 0)  # no object boxes
  assert out["interaction_map"].shape == (2, 2, 2, 2) and out["has_interaction"] == 1
  flipped = clip_sampler.BoxRasterizer(grid=(2, 2, 2))(
      record, clip_sampler.Clip(clip.pixels, clip.indices, CropWindow(0, 0, 10, 10, 4, True)))
  np.testing.assert_array_equal(flipped["interaction_map"][..., 0], hands[:, :, ::-1])
  bare = clip_sampler.BoxRasterizer(grid=(2, 2, 2))(frame_coded_record(num_frames=2), clip)
  assert bare["has_interaction"] == 0 and not bare["interaction_map"].any()


def test_invalid_boxes_are_named():
  inverted = np.array([[0, 0.5, 0.1, 0.2, 0.4, 0.9]], np.float32)
  with pytest.raises(stream.ConfigMismatchError, match="record 'v': field 'object_boxes': box row 0"):
    clip_sampler.check_boxes(frame_coded_record(num_frames=2, object_boxes=inverted))
