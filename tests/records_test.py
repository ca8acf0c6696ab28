"""Record format and random-access sources: tf.Example round trip, TFRecord framing, errors."""

import os
import re

import numpy as np
import pytest

from egoexo_jax.input import records, sources


def make_record(i=0, boxes=True):
  return records.VideoRecord(
      video_id=f"video_{i}", fps=29.97, height=48, width=64,
      frames=[bytes([i, j]) * 7 for j in range(5)], labels=np.array([i % 3]),
      ego_logits=np.array([1.5, -0.5], np.float32), object_logits=np.arange(10, dtype=np.float32),
      hand_boxes=np.array([[1, .1, .2, .3, .4, .9]], np.float32) if boxes else None,
      object_boxes=np.zeros((0, 6), np.float32) if boxes else None)


def write_shard(path, recs):
  with open(path, "wb") as f:
    for r in recs:
      records.write_tfrecord(f, records.encode_example(r))


def test_example_round_trip_keeps_every_field():
  r = make_record(4)
  back = records.decode_example(records.encode_example(r))
  assert back.video_id == "video_4" and back.num_frames == 5 and back.frames == r.frames
  assert back.fps == pytest.approx(29.97) and (back.height, back.width) == (48, 64)
  np.testing.assert_array_equal(back.labels, [1])
  np.testing.assert_allclose(back.ego_logits, r.ego_logits)
  np.testing.assert_allclose(back.object_logits, r.object_logits)
  np.testing.assert_allclose(back.hand_boxes, r.hand_boxes)
  assert back.object_boxes.shape == (0, 6)  # detector ran, found nothing: present and empty
  bare = records.decode_example(records.encode_example(make_record(1, boxes=False)))
  assert bare.hand_boxes is None and bare.object_boxes is None  # no detector output at all


def test_masked_crc32c_known_value():
  # crc32c(b"123456789") = 0xE3069283 is the standard CRC-32C check value; the mask is TFRecord's.
  import google_crc32c
  assert google_crc32c.value(b"123456789") == 0xE3069283
  crc = 0xE3069283
  assert records.masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_tfrecords_are_read_by_tensorflow(tmp_path):
  import tensorflow as tf
  path = str(tmp_path / "a.tfrecord-00000-of-00001")
  write_shard(path, [make_record(i) for i in range(3)])
  ids = [tf.train.Example.FromString(x.numpy()).features.feature["video_id"].bytes_list.value[0]
         for x in tf.data.TFRecordDataset(path)]
  assert ids == [b"video_0", b"video_1", b"video_2"]


def test_tfrecord_source_random_access_over_shards(tmp_path):
  write_shard(tmp_path / "t.tfrecord-00000-of-00002", [make_record(0), make_record(2)])
  write_shard(tmp_path / "t.tfrecord-00001-of-00002", [make_record(1)])
  source = sources.open_records(str(tmp_path / "t.tfrecord-*"))
  assert len(source) == 3
  assert [source[i].video_id for i in (2, 0, 1)] == ["video_1", "video_0", "video_2"]
  assert source.where(2).endswith("t.tfrecord-00001-of-00002#0")
  import pickle
  assert pickle.loads(pickle.dumps(source))[1].video_id == "video_2"  # Grain workers get a pickled copy


def test_tfrecord_source_is_safe_under_concurrent_reads(tmp_path):
  # Grain reads with several threads per process; they share the source's file descriptors.
  from concurrent.futures import ThreadPoolExecutor
  recs = [make_record(i) for i in range(40)]
  for r in recs:
    r.frames = [bytes([r.labels[0]]) * 5000 * (j + 1) for j in range(3)]  # payloads of different sizes
  write_shard(tmp_path / "c.tfrecord", recs)
  source = sources.open_records(str(tmp_path / "c.tfrecord"))
  order = np.random.default_rng(0).integers(0, 40, 2000)
  with ThreadPoolExecutor(16) as pool:
    ids = list(pool.map(lambda i: source[int(i)].video_id, order))
  assert ids == [f"video_{i}" for i in order]


def test_array_record_source(tmp_path):
  from array_record.python import array_record_module
  path = str(tmp_path / "a.array_record-00000-of-00001")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for i in range(3):
    writer.write(records.encode_example(make_record(i)))
  writer.close()
  source = sources.open_records(str(tmp_path / "a.array_record-*"))
  assert len(source) == 3 and source[2].video_id == "video_2" and source.where(1).endswith("#1")


def test_corrupt_payload_is_reported_with_file_and_record(tmp_path):
  path = str(tmp_path / "c.tfrecord")
  write_shard(path, [make_record(0), make_record(1)])
  data = bytearray(open(path, "rb").read())
  data[-10] ^= 0xFF  # flip a byte inside the second record's payload
  open(path, "wb").write(bytes(data))
  source = sources.open_records(path)
  assert source[0].video_id == "video_0"
  with pytest.raises(records.RecordError, match=r"c\.tfrecord#1: corrupt record payload"):
    source[1]


def test_truncated_file_is_reported_when_indexed(tmp_path):
  path = str(tmp_path / "t.tfrecord")
  write_shard(path, [make_record(0), make_record(1)])
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 20)
  with pytest.raises(records.RecordError, match=r"t\.tfrecord#1: truncated record"):
    sources.open_records(path)


def test_missing_fields_and_bad_boxes_are_named():
  from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2
  example = example_pb2.Example.FromString(records.encode_example(make_record(0)))
  del example.features.feature["labels"]
  with pytest.raises(records.RecordError, match=r"x#3: missing required field 'labels'"):
    records.decode_example(example.SerializeToString(), "x#3")
  bad = make_record(0)
  bad.hand_boxes = np.array([[7, .1, .2, .3, .4, .9]], np.float32)  # frame 7 of 5
  with pytest.raises(records.RecordError, match="'hand_boxes' has frame indices outside"):
    records.decode_example(records.encode_example(bad))
  with pytest.raises(records.RecordError, match="not a tf.Example"):
    records.decode_example(b"\xff\xff\xff", "y#0")


def test_unmatched_pattern_and_mixed_formats(tmp_path):
  with pytest.raises(FileNotFoundError, match="no record files match"):
    sources.open_records(str(tmp_path / "nothing-*"))
  write_shard(tmp_path / "m.tfrecord", [make_record(0)])
  (tmp_path / "m.array_record").write_bytes(b"")
  with pytest.raises(ValueError, match="mixes TFRecord and ArrayRecord"):
    sources.open_records(str(tmp_path / "m.*"))



# --------------------------------------------------------------------------- opening a dataset (issue 15)


def test_box_problem_names_the_first_invalid_row_and_its_frame():
  good = [[0, .1, .2, .3, .4, .9], [2, 0, 0, 1, 1, 1.0]]
  assert records.box_problem(np.array(good, np.float32)) is None
  assert records.box_problem(np.zeros((0, 6), np.float32)) is None
  cases = [
      ([3, .1, .2, np.nan, .4, .9], r"box row 2 \(frame 3\) has a non-finite value: \[0\.1, 0\.2, nan, 0\.4, 0\.9\]"),
      ([3, .3, .2, .1, .4, .9], r"box row 2 \(frame 3\) is inverted \(x2 < x1 or y2 < y1\)"),
      ([3, .1, .5, .3, .4, .9], r"box row 2 \(frame 3\) is inverted"),
      ([3, .1, .2, .3, .4, 50.0], r"box row 2 \(frame 3\) has a score outside \[0, 1\]: .*50\.0\] \(1 such rows\)"),
      ([3, -.1, .2, .3, .4, .9], r"box row 2 \(frame 3\) has a coordinate outside \[0, 1\]"),
  ]
  for bad, message in cases:
    problem = records.box_problem(np.array(good + [bad], np.float32))
    assert problem is not None and re.search(message, problem), problem


def test_paths_with_glob_characters_and_commas_are_taken_literally(tmp_path):
  folder = tmp_path / "run[1],b"  # a workdir whose name is a glob class and holds a comma
  folder.mkdir()
  for i in range(2):
    write_shard(folder / f"t.tfrecord-0000{i}-of-00002", [make_record(2 * i), make_record(2 * i + 1)])
  (tmp_path / "run1").mkdir()  # what the unescaped class '[1]' would match instead
  write_shard(tmp_path / "run1" / "t.tfrecord-00000-of-00001", [make_record(7)])
  source = sources.open_records(str(folder / "t.tfrecord-*"))
  assert len(source) == 4 and source[3].video_id == "video_3" and source.where(2).startswith(str(folder))
  # A comma-separated list whose entries contain commas, a literal path and a glob.
  first = str(folder / "t.tfrecord-00000-of-00002")
  assert sources.expand_pattern(f"{first},{tmp_path / 'run1' / '*'}") == [
      first, str(tmp_path / "run1" / "t.tfrecord-00000-of-00001")]
  assert sources.expand_pattern(f"{tmp_path / 'run1' / '*'}, {first}")[1] == first
  with pytest.raises(FileNotFoundError, match=r"no record files match '.*nothing\.tfrecord'"):
    sources.expand_pattern(f"{first},{tmp_path / 'nothing.tfrecord'}")


def test_a_missing_shard_of_a_set_is_an_error_naming_it(tmp_path):
  for i in (0, 2, 3):
    write_shard(tmp_path / f"s.tfrecord-0000{i}-of-00004", [make_record(i)])
  with pytest.raises(FileNotFoundError, match=r"s\.tfrecord-00001-of-00004 is missing \(1 of 4 shards"):
    sources.open_records(str(tmp_path / "s.tfrecord-*"), strict=False)
  write_shard(tmp_path / "s.tfrecord-00001-of-00004", [make_record(1)])
  assert len(sources.open_records(str(tmp_path / "s.tfrecord-*"))) == 4


def test_damaged_shards_keep_their_records_before_the_damage_unless_strict(tmp_path, caplog):
  write_shard(tmp_path / "d.tfrecord-00000-of-00003", [make_record(0), make_record(1)])
  write_shard(tmp_path / "d.tfrecord-00001-of-00003", [make_record(2), make_record(3), make_record(4)])
  write_shard(tmp_path / "d.tfrecord-00002-of-00003", [make_record(5), make_record(6)])
  truncated = tmp_path / "d.tfrecord-00001-of-00003"
  with open(truncated, "r+b") as f:
    f.truncate(os.path.getsize(truncated) - 20)  # record 2 of shard 1 is cut
  data = bytearray((tmp_path / "d.tfrecord-00002-of-00003").read_bytes())
  data[0] ^= 0xFF  # shard 2's first header: its length CRC no longer matches
  (tmp_path / "d.tfrecord-00002-of-00003").write_bytes(bytes(data))
  pattern = str(tmp_path / "d.tfrecord-*")
  with pytest.raises(records.RecordError, match=r"00001-of-00003#2: truncated record"):
    sources.open_records(pattern, strict=True)
  caplog.set_level("INFO")
  source = sources.open_records(pattern, strict=False)
  assert [source[i].video_id for i in range(len(source))] == ["video_0", "video_1", "video_2", "video_3"]
  assert [p for p, _ in source.damaged] == [str(truncated), str(tmp_path / "d.tfrecord-00002-of-00003")]
  assert "DAMAGED SHARD" in caplog.text and "keeping its first 2 records" in caplog.text
  assert f"Opened 3 record files (4 records) for '{pattern}'; 2 DAMAGED" in caplog.text


def test_a_pattern_without_records_is_an_error_naming_it(tmp_path):
  (tmp_path / "e.tfrecord-00000-of-00001").write_bytes(b"")
  with pytest.raises(records.RecordError, match=r"'.*e\.tfrecord-\*' matches 1 files but they hold no records"):
    sources.open_records(str(tmp_path / "e.tfrecord-*"))


def test_sample_indices_spread_over_shards_first_records_first():
  # shards of 3, 0, 7 and 2 records
  assert sources.sample_indices([0, 3, 3, 10], 12, 5) == [0, 3, 10, 1, 4]
  assert sources.sample_indices([0, 3, 3, 10], 12, 2) == [0, 10]
  assert sources.sample_indices([0, 3, 3, 10], 12, 100) == [0, 3, 10, 1, 4, 11, 2, 5, 6, 7, 8, 9]
  assert sources.sample_indices([0], 0, 5) == []


def test_damaged_array_record_shards_are_skipped_or_their_records_unreadable(tmp_path):
  from array_record.python import array_record_module
  for shard in range(2):
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / f"a.array_record-0000{shard}-of-00002"),
                                                   "group_size:1")
    for i in range(3):
      writer.write(records.encode_example(make_record(3 * shard + i)))
    writer.close()
  truncated = tmp_path / "a.array_record-00001-of-00002"
  truncated.write_bytes(truncated.read_bytes()[:os.path.getsize(truncated) // 2])
  pattern = str(tmp_path / "a.array_record-*")
  with pytest.raises(records.RecordError, match=r"00001-of-00002: cannot open the ArrayRecord file"):
    sources.open_records(pattern)
  source = sources.open_records(pattern, strict=False)
  assert len(source) == 3 and [p for p, _ in source.damaged] == [str(truncated)]
  # A corrupt chunk inside a readable file: that record is a RecordError (skipped when drawn).
  first = tmp_path / "a.array_record-00000-of-00002"
  data = bytearray(first.read_bytes())
  data[100] ^= 0xFF  # inside the first chunk's header
  first.write_bytes(bytes(data))
  source = sources.open_records(str(first))
  with pytest.raises(records.RecordError, match=r"00000-of-00002#0: cannot read the record \(Corrupted"):
    source[0]
  assert source[1].video_id == "video_1"


def test_one_shard_named_literally_is_taken_alone(tmp_path):
  write_shard(tmp_path / "s.tfrecord-00000-of-00004", [make_record(0)])
  assert len(sources.open_records(str(tmp_path / "s.tfrecord-00000-of-00004"))) == 1
  with pytest.raises(FileNotFoundError, match=r"s\.tfrecord-00001-of-00004 is missing \(3 of 4"):
    sources.open_records(str(tmp_path / "s.tfrecord-0000[0]-of-00004"))
