"""One row -> one record (convert_video.py): --fps resampling, against full-rate decodes of the same files."""

import pathlib

import av
import numpy as np
import pytest

from egoexo_jax.input import convert_video, teacher_files, transforms

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLIPS = ROOT / "data" / "clips"


@pytest.fixture(scope="module")
def video_60fps(tmp_path_factory):
  """A 2 s, 60 fps H.264 video (120 frames): a bright bar moving 1 px per frame over a grey ramp."""
  path = tmp_path_factory.mktemp("v60") / "v60.mp4"
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=60)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for i in range(120):
      image = np.tile(np.linspace(0, 200, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
      image[:, i % 60] = 255
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return str(path)


def test_fps_keeps_every_other_frame_of_a_60fps_video(video_60fps):
  full = convert_video.decode_segment(video_60fps, None, None, short_side=48, jpeg_quality=75)
  half = convert_video.decode_segment(video_60fps, None, None, short_side=48, jpeg_quality=75, max_fps=30)
  assert full.fps == pytest.approx(60) and len(full.jpegs) == 120 and full.frame_indices == list(range(120))
  assert half.fps == 30 and half.frame_indices == list(range(0, 120, 2))
  assert half.jpegs == full.jpegs[::2]  # the same frames, encoded the same way
  assert half.seconds == pytest.approx(full.seconds)
  # A segment: frames from 0.5 s, every other one counted from the segment's first frame.
  part = convert_video.decode_segment(video_60fps, 0.5, 1.0, short_side=48, jpeg_quality=75, max_fps=30,
                                      from_beginning=True)
  assert part.frame_indices == list(range(30, 60, 2)) and part.jpegs == full.jpegs[30:60:2]


def test_fps_at_or_above_the_streams_rate_keeps_every_frame():
  file = str(CLIPS / "carphone_pristine.mp4")  # 29.97 fps: within 1% of 30
  full = convert_video.decode_segment(file, None, None, short_side=48, jpeg_quality=75)
  for max_fps in (30, 50):
    same = convert_video.decode_segment(file, None, None, short_side=48, jpeg_quality=75, max_fps=max_fps)
    assert same.jpegs == full.jpegs and same.fps == full.fps == pytest.approx(30000 / 1001)


def test_sampler_draws_the_same_moments_from_60fps_frames_and_from_30fps_storage():
  """transforms.sample_frame_indices at target_fps 30 reads the record's fps: with the same random draw, a
  60 fps video stored at 30 (stored frame j = source frame 2j) gives an 8x8 clip whose every frame is
  within 2 source frames (1/30 s, one stored frame) of the frame drawn from all 60 fps frames."""
  for num_frames in (120, 300, 901):
    for seed in range(5):
      full = transforms.sample_frame_indices(num_frames, 8, 8, np.random.default_rng(seed), fps=60, target_fps=30)
      stored = transforms.sample_frame_indices((num_frames + 1) // 2, 8, 8, np.random.default_rng(seed),
                                               fps=30, target_fps=30)
      assert np.abs(2 * stored - full).max() <= 2, (num_frames, seed, full, stored)


def test_boxes_of_a_resampled_segment_follow_its_kept_frames():
  """Detector rows for decoded frames 0..5; stored frames are decoded frames 1, 3, 5 (a 60 -> 30 fps
  segment from frame 1): each stored frame j carries the boxes of decoded frame 2j + 1, in [0, 1]."""
  entries = [(np.array([[10.0 * k, 0, 10.0 * k + 10, 20, 0.9]]), np.array([[0, 0, 5, 5, 0.8]])) for k in range(6)]
  hands, objects = teacher_files.convert_detections(
      entries, "made.npy", first_frame=1, num_frames=3, decoded_frames=6, width=100, height=40,
      frame_indices=[1, 3, 5])
  np.testing.assert_allclose(objects, [[0, 0.1, 0, 0.2, 0.5, 0.9], [1, 0.3, 0, 0.4, 0.5, 0.9],
                                       [2, 0.5, 0, 0.6, 0.5, 0.9]], rtol=1e-6)
  np.testing.assert_allclose(hands[:, 0], [0, 1, 2])
  # Without frame_indices, the segment is contiguous: stored frame j is decoded frame first_frame + j.
  _, contiguous = teacher_files.convert_detections(
      entries, "made.npy", first_frame=1, num_frames=3, decoded_frames=6, width=100, height=40)
  np.testing.assert_allclose(contiguous[:, 1], [0.1, 0.2, 0.3])
