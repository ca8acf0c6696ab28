"""Tests of the video -> records converter, on the real clips shipped in data/clips."""

import csv
import io
import json
import math
import os
import pathlib
import pickle
import re
import subprocess
import sys

import av

import numpy as np
import pytest
from PIL import Image

from egoexo_jax.input import convert
from egoexo_jax.input import convert_video
from egoexo_jax.input import records
from egoexo_jax.input import sources

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"
SHORT_SIDE = 96
# Mean absolute error (0..255) between a stored JPEG frame and the same frame decoded straight from
# the video. Measured at short side 96 on these segments: per frame <= 3.4, segment means 1.3-2.4.
# The neighbouring frame scores >= 4.0 on average, a red/blue swap >= 6.
MAX_FRAME_ERROR = 4.0
MAX_SEGMENT_ERROR = 3.0
JPEG_QUALITY = 90  # the quality those errors were measured at (the converter's default is lower: README "Storage")

ROUND_TRIP_ROWS = [  # path, labels, video_id, start, end
    ("clips/cup.mp4", "1 6", "cup_mid", "3", "4.5"),  # seeks to a keyframe before 3 s
    ("clips/bikes.mp4", "3", "bikes_mid", "5", "6.2"),
    ("clips/carphone_pristine.mp4", "5", "", "", ""),  # the whole video, default video_id
]


def write_manifest(folder: pathlib.Path, rows, header=("path", "labels", "video_id", "start_sec", "end_sec")):
  """A manifest in `folder`, whose clips/ links to data/clips so that relative paths resolve."""
  if not (folder / "clips").exists():
    (folder / "clips").symlink_to(DATA / "clips")
  manifest = folder / "manifest.csv"
  with open(manifest, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(manifest)


def reference_frames(file: str, start: float, end: float, short_side: int):
  """(original decoded indices, RGB frames) of [start, end) s, decoded and resized independently.

  Times follow the documented rule: pts minus the stream start, as a running maximum in decode order.
  """
  indices, frames = [], []
  with av.open(file) as container:
    stream = container.streams.video[0]
    latest = -math.inf
    for index, frame in enumerate(container.decode(stream)):
      latest = max(latest, float((frame.pts - (stream.start_time or 0)) * stream.time_base))
      if start <= latest < end:
        scale = min(1.0, short_side / min(frame.width, frame.height))
        frames.append(frame.reformat(width=round(frame.width * scale), height=round(frame.height * scale),
                                     format="rgb24").to_ndarray().astype(np.float32))
        indices.append(index)
  return indices, frames


def jpeg_frames(record: records.VideoRecord) -> list[np.ndarray]:
  return [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32) for jpeg in record.frames]


def output_files(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The round-trip segments converted once: 2 shards, both formats, ego and object logits."""
  folder = tmp_path_factory.mktemp("round_trip")
  manifest = write_manifest(folder, ROUND_TRIP_ROWS)
  report = convert.convert_manifest(
      manifest, str(folder / "out" / "train"), short_side=SHORT_SIDE, num_shards=2, jpeg_quality=JPEG_QUALITY,
      formats=("tfrecord", "array_record"), ego_logits=str(DATA / "pseudo_labels" / "ego_logits.pkl"),
      object_logits=str(DATA / "pseudo_labels" / "object_logits.pkl"))
  return folder, report


def test_round_trip_frames_labels_fps(converted):
  folder, report = converted
  assert report.written == 3 and not report.skipped
  source = sources.open_records(str(folder / "out" / "train.tfrecord-*"))
  by_id = {source[i].video_id: source[i] for i in range(len(source))}
  assert sorted(by_id) == ["bikes_mid", "carphone_pristine", "cup_mid"]
  expected_fps = {"cup_mid": 26.777, "bikes_mid": 25.0, "carphone_pristine": 30000 / 1001}
  for path, labels, video_id, start, end in ROUND_TRIP_ROWS:
    record = by_id[video_id or "carphone_pristine"]
    np.testing.assert_array_equal(record.labels, [int(x) for x in labels.split()])
    _, reference = reference_frames(str(DATA / path), float(start or 0), float(end or math.inf), SHORT_SIDE)
    stored = jpeg_frames(record)
    assert record.num_frames == len(reference) > 0
    assert record.fps == pytest.approx(expected_fps[record.video_id], rel=1e-5)
    assert (record.height, record.width) == reference[0].shape[:2] == stored[0].shape[:2]
    assert min(reference[0].shape[:2]) == SHORT_SIDE
    errors = [np.abs(s - r).mean() for s, r in zip(stored, reference)]
    assert max(errors) < MAX_FRAME_ERROR, (record.video_id, max(errors))
    assert np.mean(errors) < MAX_SEGMENT_ERROR, (record.video_id, np.mean(errors))
    for i, frame in enumerate(stored):  # each stored frame is closest to its own source frame
      nearby = range(max(0, i - 3), min(len(reference), i + 4))
      assert min(nearby, key=lambda k: np.abs(frame - reference[k]).mean()) == i, (record.video_id, i)
  # segment lengths: 1.5 s of cup at 26.8 fps, 1.2 s of bikes at 25 fps, all 120 carphone frames
  assert [by_id[k].num_frames for k in ("cup_mid", "bikes_mid", "carphone_pristine")] == [40, 30, 120]


def test_teacher_logits_come_from_the_pickles(converted):
  folder, _ = converted
  with open(DATA / "pseudo_labels" / "ego_logits.pkl", "rb") as f:
    ego = pickle.load(f)
  source = sources.open_records(str(folder / "out" / "train.tfrecord-*"))
  for i in range(len(source)):
    record = source[i]
    path = next(row[0] for row in ROUND_TRIP_ROWS if (row[2] or "carphone_pristine") == record.video_id)
    np.testing.assert_allclose(record.ego_logits, ego[path])
    assert record.object_logits.shape == (1000,)
    assert record.hand_boxes is None and record.object_boxes is None  # no hand_object_dir given


def test_tfrecords_parse_with_tensorflow(converted):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  folder, report = converted
  tfrecords = [p for p in report.output_files if ".tfrecord-" in p]
  video_ids = []
  for data in tf.data.TFRecordDataset(tfrecords):
    example = tf.train.Example.FromString(data.numpy())
    feature = example.features.feature
    video_ids.append(feature["video_id"].bytes_list.value[0].decode())
    assert len(feature["frames"].bytes_list.value) == feature["num_frames"].int64_list.value[0]
    assert len(feature["ego_logits"].float_list.value) == 2
  assert sorted(video_ids) == ["bikes_mid", "carphone_pristine", "cup_mid"]


def test_array_record_matches_tfrecord(converted):
  folder, _ = converted
  array_source = sources.open_records(str(folder / "out" / "train.array_record-*"))
  tf_source = sources.open_records(str(folder / "out" / "train.tfrecord-*"))
  assert isinstance(array_source, sources.ArrayRecordSource) and len(array_source) == len(tf_source) == 3
  for i in range(3):
    a, b = array_source[i], tf_source[i]
    assert a.video_id == b.video_id and a.frames == b.frames


def test_shards_summary_and_no_temporary_files(converted):
  folder, report = converted
  assert output_files(folder / "out") == [
      "train.array_record-00000-of-00002", "train.array_record-00001-of-00002", "train.json",
      "train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002"]
  ids = lambda shard: [r.video_id for r in (sources.TFRecordSource([str(folder / "out" / shard)])[i]
                                            for i in range(2 - shard.endswith("1-of-00002")))]
  assert ids("train.tfrecord-00000-of-00002") == ["cup_mid", "carphone_pristine"]  # manifest rows 0, 2
  assert ids("train.tfrecord-00001-of-00002") == ["bikes_mid"]  # row 1
  import json  # pylint: disable=g-import-not-at-top
  with open(report.summary_file) as f:
    summary = json.load(f)
  assert summary["num_records"] == 3 and summary["labels"]["max_label"] == 6
  assert summary["records_with_field"]["ego_logits"] == 3 and summary["object_logits_dim"] == 1000
  assert summary["num_frames"]["total"] == 190


def test_hand_object_boxes_from_shipped_npy_and_seek_consistency(tmp_path, converted):
  """With an .npy the video is decoded from its start; frames must equal the seeking path's."""
  folder, _ = converted
  manifest = write_manifest(tmp_path, [ROUND_TRIP_ROWS[0], ("clips/box.mp4", "0", "box_late", "10", "11.5")])
  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=SHORT_SIDE,
                                    jpeg_quality=JPEG_QUALITY, hand_object_dir=str(DATA / "pseudo_labels" / "hand_object"))
  source = sources.open_records(str(tmp_path / "out" / "t.tfrecord-*"))
  seeked = sources.open_records(str(folder / "out" / "train.tfrecord-*"))
  cup = next(seeked[i] for i in range(len(seeked)) if seeked[i].video_id == "cup_mid")
  assert source[0].frames == cup.frames
  box = source[1]
  _, reference = reference_frames(str(DATA / "clips" / "box.mp4"), 10, 11.5, SHORT_SIDE)
  assert box.num_frames == len(reference) == 45
  seek_path = convert.decode_segment(str(DATA / "clips" / "box.mp4"), 10, 11.5, short_side=SHORT_SIDE,
                                     jpeg_quality=JPEG_QUALITY)
  assert seek_path.first_frame is None and seek_path.jpegs == box.frames  # disordered pts, same frames
  for record in source[0], source[1]:
    assert record.hand_boxes is not None and record.object_boxes is not None
    for boxes in record.hand_boxes, record.object_boxes:
      assert np.all((boxes[:, 1:5] >= 0) & (boxes[:, 1:5] <= 1))
      assert np.all((boxes[:, 0] >= 0) & (boxes[:, 0] < record.num_frames))
  assert report.without_boxes == []


def test_boxes_from_handwritten_npy(tmp_path):
  """Normalised coordinates, segment-relative frames, frames outside the segment dropped."""
  video = DATA / "clips" / "carphone_pristine.mp4"  # 176 x 144, 120 frames
  indices, _ = reference_frames(str(video), 1.0, 2.0, 64)
  first, last = indices[0], indices[-1]
  per_frame = np.empty((120, 2), dtype=object)
  hand = np.array([[17.6, 14.4, 88.0, 72.0, 0.9, 1, 0, 0, 0, 1], [0, 0, 176, 144, 0.2, 0, 0, 0, 0, 0]], np.float32)
  obj = np.array([[44.0, 36.0, 132.0, 108.0, 0.7]], np.float32)
  per_frame[first - 1] = (obj, hand)  # before the segment: dropped
  per_frame[first] = (obj, None)
  per_frame[first + 5] = (None, hand)
  per_frame[first + 6] = (np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32))
  per_frame[last] = (obj, hand)
  per_frame[last + 1] = (obj, hand)  # after the segment: dropped
  npy_dir = tmp_path / "hand_object"
  (npy_dir / "clips").mkdir(parents=True)
  np.save(npy_dir / "clips" / "carphone_pristine.npy", per_frame, allow_pickle=True)
  manifest = write_manifest(tmp_path, [("clips/carphone_pristine.mp4", "5", "talk", "1", "2"),
                                       ("clips/cup.mp4", "1", "cup", "0", "1")])
  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=64,
                                    hand_object_dir=str(npy_dir), box_score_threshold=0.0)
  talk, cup = (sources.open_records(str(tmp_path / "out" / "t.tfrecord-*"))[i] for i in range(2))
  n = last - first
  np.testing.assert_allclose(talk.hand_boxes, [
      [5, .1, .1, .5, .5, .9], [5, 0, 0, 1, 1, .2], [n, .1, .1, .5, .5, .9], [n, 0, 0, 1, 1, .2]], atol=1e-6)
  np.testing.assert_allclose(talk.object_boxes, [[0, .25, .25, .75, .75, .7], [n, .25, .25, .75, .75, .7]],
                             atol=1e-6)
  assert cup.hand_boxes is None and cup.object_boxes is None  # no .npy for cup: no detector output
  assert report.without_boxes == ["clips/cup.mp4"]

  # a frame list 2 frames short is tolerated; 10 frames short is an error naming the file
  np.save(npy_dir / "clips" / "carphone_pristine.npy", per_frame[:118], allow_pickle=True)
  convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=64, hand_object_dir=str(npy_dir))
  np.save(npy_dir / "clips" / "carphone_pristine.npy", per_frame[:110], allow_pickle=True)
  with pytest.raises(convert.PseudoLabelError, match=r"carphone_pristine\.npy.*110 frames.*120"):
    convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=64, hand_object_dir=str(npy_dir))


def test_missing_pickle_key(tmp_path):
  manifest = write_manifest(tmp_path, [("clips/carphone_pristine.mp4", "5", "a", "0", "1"),
                                       ("clips/tree.avi", "2", "b", "0", "5")])
  ego = tmp_path / "ego.pkl"
  with open(ego, "wb") as f:
    pickle.dump({"clips/carphone_pristine.mp4": np.array([1.0, -1.0])}, f)
  with pytest.raises(convert.PseudoLabelError, match=r"ego\.pkl.*'clips/tree\.avi'.*line 3"):
    convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32, ego_logits=str(ego))
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32, ego_logits=str(ego),
                                    allow_missing_pseudo_labels=True)
  source = sources.open_records(str(tmp_path / "out" / "t.tfrecord-*"))
  np.testing.assert_array_equal(source[0].ego_logits, [1.0, -1.0])
  assert source[1].ego_logits is None
  assert report.missing_pseudo_labels["ego_logits"] == ["clips/tree.avi"]

  objects = tmp_path / "objects.pkl"
  with open(objects, "wb") as f:
    pickle.dump({"clips/carphone_pristine.mp4": np.zeros(10), "clips/tree.avi": np.zeros(12)}, f)
  with pytest.raises(convert.PseudoLabelError, match=r"objects\.pkl.*'clips/tree\.avi' has 12.*10"):
    convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32, object_logits=str(objects))


def test_corrupt_and_truncated_videos_are_skipped_or_fatal(tmp_path):
  (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
  for name in ("cup.mp4", "box.mp4"):  # cup decodes half its frames silently; box raises mid-stream
    data = (DATA / "clips" / name).read_bytes()
    (tmp_path / f"half_{name}").write_bytes(data[:len(data) // 2])
  rows = [("garbage.mp4", "0", "", "", ""), ("clips/carphone_pristine.mp4", "5", "", "0", "1"),
          ("half_cup.mp4", "1", "", "", ""), ("half_box.mp4", "0", "", "", ""),
          ("half_cup.mp4", "1", "", "6", "7"), ("missing.mp4", "1", "", "", "")]
  manifest = write_manifest(tmp_path, rows)
  # 5 of the 6 rows are bad on purpose: the default guard (min_fraction_written 0.5) would refuse the run.
  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32, min_fraction_written=0.0)
  assert report.written == 1
  skipped = dict(report.skipped)
  assert [p for p, _ in report.skipped] == ["garbage.mp4", "half_cup.mp4", "half_box.mp4", "half_cup.mp4",
                                             "missing.mp4"]
  assert "truncated" in report.skipped[1][1] and "no frames in segment" in report.skipped[3][1]
  assert "cannot decode" in skipped["missing.mp4"]
  assert len(sources.open_records(str(tmp_path / "out" / "t.tfrecord-*"))) == 1

  with pytest.raises(convert.ConversionError, match=r"garbage\.mp4 \(manifest line 2\)"):
    convert.convert_manifest(manifest, str(tmp_path / "strict" / "t"), short_side=32, strict=True)
  assert output_files(tmp_path / "strict") == []  # no shard, no temporary file, no summary


def test_manifest_errors_name_the_line(tmp_path):
  cases = [
      ([("clips/tree.avi", "two", "", "", "")], r"manifest\.csv:2: column 'labels' is 'two'"),
      ([("clips/tree.avi", "1", "", "", ""), ("clips/tree.avi", "", "", "", "")], r":3: column 'labels' is empty"),
      ([("clips/tree.avi", "1", "", "5", "4")], r":2: end_sec 4 is not after start_sec 5"),
      ([("clips/tree.avi", "1", "x", "", ""), ("clips/cup.mp4", "1", "x", "", "")], r":3: video_id 'x'.*line 2"),
  ]
  for rows, message in cases:
    with pytest.raises(convert.ManifestError, match=message):
      convert.read_manifest(write_manifest(tmp_path, rows))
  with pytest.raises(convert.ManifestError, match=r":1: .* no 'labels' column"):
    convert.read_manifest(write_manifest(tmp_path, [("clips/tree.avi",)], header=("path",)))
  rows = convert.read_manifest(write_manifest(
      tmp_path, [("clips/tree.avi", "2 6", "", "20", "", "exo")],
      header=("path", "labels", "video_id", "start_sec", "end_sec", "view")))
  assert rows[0].video_id == "tree_20-end" and rows[0].labels == (2, 6) and rows[0].end_sec is None
  assert rows[0].file == str(tmp_path / "clips" / "tree.avi")


def test_no_upscaling_and_shipped_manifest():
  assert convert.stored_size(640, 480, 320) == (427, 320)
  assert convert.stored_size(176, 144, 320) == (176, 144)  # already smaller: kept
  rows = convert.read_manifest(str(DATA / "manifest.csv"))
  assert len(rows) == 17 and all(os.path.exists(row.file) for row in rows)
  num_classes = len((DATA / "classes.txt").read_text().splitlines())
  assert max(max(row.labels) for row in rows) < num_classes
  for name in ("ego_logits.pkl", "object_logits.pkl"):
    assert set(convert.load_logits(str(DATA / "pseudo_labels" / name), name)) == {row.path for row in rows}


def test_cli_with_workers_matches_library_output(tmp_path):
  rows = [("clips/carphone_pristine.mp4", "5", "", "0", "2"), ("clips/carphone_pristine.mp4", "5", "", "2", "4"),
          ("clips/tree.avi", "2", "", "0", "10")]
  manifest = write_manifest(tmp_path, rows)
  convert.convert_manifest(manifest, str(tmp_path / "one" / "t"), short_side=32, num_shards=2)
  result = subprocess.run(
      [sys.executable, "-m", "egoexo_jax.input.convert", f"--manifest={manifest}",
       f"--output_prefix={tmp_path / 'two' / 't'}", "--short_side=32", "--num_shards=2", "--workers=2"],
      capture_output=True, text=True, check=False, cwd=DATA.parent)
  assert result.returncode == 0, result.stderr
  assert "wrote 3 records, skipped 0 videos" in result.stdout
  for shard in ("t.tfrecord-00000-of-00002", "t.tfrecord-00001-of-00002"):
    # Compared record by record, not byte by byte: records.encode_example serialises the feature map
    # in an order that depends on the process's string hashing.
    one, two = (sources.TFRecordSource([str(tmp_path / run / shard)]) for run in ("one", "two"))
    assert len(one) == len(two) > 0
    for i in range(len(one)):
      a, b = one[i], two[i]
      assert (a.video_id, a.fps, a.height, a.width, a.frames) == (b.video_id, b.fps, b.height, b.width, b.frames)
      np.testing.assert_array_equal(a.labels, b.labels)
  # a rerun with another shard count would mix with these shards under one glob
  with pytest.raises(FileExistsError, match="another shard count"):
    convert.convert_manifest(manifest, str(tmp_path / "one" / "t"), short_side=32, num_shards=3)


def test_score_threshold_and_json_detections(tmp_path):
  """Boxes under 0.5 are dropped by default; the JSON schema gives the same boxes as the .npy."""
  video = DATA / "clips" / "carphone_pristine.mp4"  # 176 x 144, 120 frames
  per_frame = [None] * 120
  per_frame[3] = {"objects": [[44.0, 36.0, 132.0, 108.0, 0.7]],
                  "hands": [[17.6, 14.4, 88.0, 72.0, 0.9, 1, 0], [0, 0, 176, 144, 0.2, 0, 0]]}
  per_frame[4] = {"hands": []}
  folder = tmp_path / "hand_object" / "clips"
  folder.mkdir(parents=True)
  (folder / "carphone_pristine.json").write_text(json.dumps(per_frame))
  manifest = write_manifest(tmp_path, [("clips/carphone_pristine.mp4", "5", "talk", "", "")])
  convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=64,
                           hand_object_dir=str(tmp_path / "hand_object"))
  record = sources.open_records(str(tmp_path / "out" / "t.tfrecord-*"))[0]
  np.testing.assert_allclose(record.hand_boxes, [[3, .1, .1, .5, .5, .9]], atol=1e-6)  # the 0.2 box is gone
  np.testing.assert_allclose(record.object_boxes, [[3, .25, .25, .75, .75, .7]], atol=1e-6)
  per_frame[5] = {"hands": [[1, 2, 3, 4, 0.9], [1, 2, 3]]}
  (folder / "carphone_pristine.json").write_text(json.dumps(per_frame))
  with pytest.raises(convert.PseudoLabelError, match=r"carphone_pristine\.json: frame 5: 'hands'"):
    convert.convert_manifest(manifest, str(tmp_path / "out2" / "t"), short_side=64,
                             hand_object_dir=str(tmp_path / "hand_object"))


def test_logit_pickles_from_parallel_scorers_are_merged(tmp_path):
  first, second, clash = (str(tmp_path / f"{n}.pkl") for n in ("a", "b", "c"))
  for path, table in ((first, {"v1": [1.0, 2.0], "v2": [0.0, 1.0]}), (second, {"v3": [3.0, 4.0], "v2": [0.0, 1.0]}),
                      (clash, {"v1": [9.0, 9.0]})):
    with open(path, "wb") as f:
      pickle.dump(table, f)
  merged = convert.load_logit_files(f"{first}, {second}", "ego_logits", length=2)
  assert sorted(merged) == ["v1", "v2", "v3"]
  np.testing.assert_array_equal(merged["v3"], [3.0, 4.0])
  with pytest.raises(convert.PseudoLabelError, match=r"c\.pkl: entry 'v1' differs from the one in .*a\.pkl"):
    convert.load_logit_files(f"{first},{clash}", "ego_logits", length=2)


# --------------------------------------------------------------------------- bad teacher boxes and odd videos


def write_detections(tmp_path, per_frame_hands) -> str:
  """An .npy of carphone_pristine (176 x 144, 120 frames) whose frames 0.. hold the given hand rows."""
  per_frame = np.empty((120, 2), dtype=object)
  for k, hands in enumerate(per_frame_hands):
    per_frame[k] = (None, np.asarray(hands, np.float32))
  folder = tmp_path / "hand_object" / "clips"
  folder.mkdir(parents=True, exist_ok=True)
  np.save(folder / "carphone_pristine.npy", per_frame, allow_pickle=True)
  return str(tmp_path / "hand_object")


@pytest.mark.parametrize("bad_row,message", [
    ([10, 20, 30, float("nan"), .9], r"frame 2 \(hands\): 1 detections with a non-finite coordinate"),
    ([88, 20, 17.6, 72, .9], r"frame 2 \(hands\): 1 detections with an inverted box"),
    ([17.6, 14.4, 88, 72, 50.0], r"frame 2 \(hands\): 1 detections with a score outside \[0, 1\], e.g. 50"),
])
def test_bad_boxes_refuse_the_video_naming_file_and_frame(tmp_path, bad_row, message):
  good = [17.6, 14.4, 88.0, 72.0, 0.9]
  hand_object_dir = write_detections(tmp_path, [[good], [], [good, bad_row]])
  manifest = write_manifest(tmp_path, [("clips/carphone_pristine.mp4", "5", "talk", "", ""),
                                       ("clips/cup.mp4", "1", "cup", "0", "1")])
  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32,
                                    hand_object_dir=hand_object_dir)
  assert report.written == 1  # 1 of 2 meets the default min_fraction_written of 0.5
  (path, reason), = report.skipped
  assert path == "clips/carphone_pristine.mp4" and re.search(r"carphone_pristine\.npy: " + message, reason)
  assert "--repair_boxes" in reason
  with pytest.raises(convert.ConversionError, match=r"carphone_pristine\.mp4 \(manifest line 2\): .*" + message):
    convert.convert_manifest(manifest, str(tmp_path / "strict" / "t"), short_side=32,
                             hand_object_dir=hand_object_dir, strict=True)


def test_repair_boxes_drops_nan_and_inverted_rows_and_clips_scores(tmp_path, caplog):
  good = [17.6, 14.4, 88.0, 72.0, 0.9]
  rows = [good, [10, 20, 30, float("nan"), .9], [88, 20, 17.6, 72, .9], [0, 0, 176, 144, 1.7], [0, 0, 176, 144, -2]]
  hand_object_dir = write_detections(tmp_path, [rows])
  manifest = write_manifest(tmp_path, [("clips/carphone_pristine.mp4", "5", "talk", "", "")])
  caplog.set_level("WARNING")
  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32,
                                    hand_object_dir=hand_object_dir, repair_boxes=True, box_score_threshold=0.0)
  assert report.written == 1 and not report.skipped
  record = sources.open_records(str(tmp_path / "out" / "t.tfrecord-*"))[0]
  np.testing.assert_allclose(record.hand_boxes, [[0, .1, .1, .5, .5, .9], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]],
                             atol=1e-6)
  assert records.box_problem(record.hand_boxes) is None
  assert "frame 0 (hands): 1 detections with a non-finite coordinate or score" in caplog.text
  assert "2 detections with a score outside [0, 1], e.g. 1.7: clipped into [0, 1]" in caplog.text


def test_video_with_non_utf8_metadata_converts(tmp_path):
  """A title tag holding Latin-1 bytes (as old AVI tools wrote): PyAV's default open raises on it."""
  for ext in ("avi", "mp4"):
    path = tmp_path / f"made.{ext}"
    with av.open(str(path), "w") as container:
      container.metadata["title"] = "PLACEHOLDER!"
      stream = container.add_stream("mpeg4", rate=10)
      stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
      for i in range(12):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
        for packet in stream.encode(frame):
          container.mux(packet)
      for packet in stream.encode():
        container.mux(packet)
    data = path.read_bytes()
    assert data.count(b"PLACEHOLDER!") == 1
    (tmp_path / f"odd.{ext}").write_bytes(data.replace(b"PLACEHOLDER!", b"caf\xe9 \xff\xfe tags"))
    with pytest.raises(UnicodeDecodeError):
      av.open(str(tmp_path / f"odd.{ext}")).close()  # the input really has the problem
  manifest = write_manifest(tmp_path, [("odd.avi", "1", "odd_avi", "", ""), ("odd.mp4", "2", "odd_mp4", "", "")])
  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32)
  assert report.written == 2 and not report.skipped
  source = sources.open_records(str(tmp_path / "out" / "t.tfrecord-*"))
  assert [source[i].num_frames for i in range(2)] == [12, 12]


def test_unexpected_error_in_one_video_is_reported_and_skipped_or_fatal(tmp_path, monkeypatch):
  real_decode = convert_video.decode_segment

  def decode(file, *args, **kwargs):
    if file.endswith("tree.avi"):
      raise KeyError("a bug in one code path")
    return real_decode(file, *args, **kwargs)

  monkeypatch.setattr(convert_video, "decode_segment", decode)  # workers=1: the conversion runs in this process
  manifest = write_manifest(tmp_path, [("clips/carphone_pristine.mp4", "5", "", "0", "1"),
                                       ("clips/tree.avi", "2", "", "0", "2")])
  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32)
  assert report.written == 1
  assert report.skipped == [("clips/tree.avi", "unexpected error: KeyError: 'a bug in one code path'")]
  with pytest.raises(convert.ConversionError, match=r"tree\.avi \(manifest line 3\): unexpected error: KeyError"):
    convert.convert_manifest(manifest, str(tmp_path / "strict" / "t"), short_side=32, strict=True)


def test_too_few_records_written_is_an_error_and_writes_nothing(tmp_path):
  rows = [("clips/carphone_pristine.mp4", "5", "", "0", "1"), ("gone_1.mp4", "1", "", "", ""),
          ("gone_2.mp4", "1", "", "", "")]
  manifest = write_manifest(tmp_path, rows)
  with pytest.raises(convert.ConversionError, match=r"wrote 1 of 3 videos, under min_fraction_written=0\.5; "
                     r"nothing was written\. Most common reasons: 2 x 'cannot decode'"):
    convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32)
  assert output_files(tmp_path / "out") == []
  report = convert.convert_manifest(manifest, str(tmp_path / "out" / "t"), short_side=32, min_fraction_written=0.3)
  assert report.written == 1
  # The command line: no video at all exits 1 with one line, even with the guard off.
  none = write_manifest(tmp_path, [("gone_1.mp4", "1", "", "", "")])
  result = subprocess.run(
      [sys.executable, "-m", "egoexo_jax.input.convert", f"--manifest={none}",
       f"--output_prefix={tmp_path / 'none' / 't'}", "--min_fraction_written=0"],
      capture_output=True, text=True, check=False, cwd=DATA.parent)
  assert result.returncode == 1
  assert "error: " in result.stderr and "wrote 0 of 1 videos" in result.stderr
  assert output_files(tmp_path / "none") == []
