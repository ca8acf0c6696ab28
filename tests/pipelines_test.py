"""The Ego-Exo train pipeline and the shared Grain tail (stream.py) on real-clip records: shapes, determinism,
resume, workers, host slices, skipped records."""

import numpy as np
import pytest
from absl import flags

from conftest import tiny_config
from testlib import expected_positions, write_records_with_bad_content, write_records_with_corrupt_ones
from egoexo_jax.input import egoexo_pipeline, records, sources, stream


GRID = (4, 2, 2)  # the interaction-map grid these tests draw on (tiny_config's model has this one)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_shapes_dtypes_and_masks(real_record_pattern):
  config = tiny_config(real_record_pattern)
  batch = next(iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID)))
  expected = {
      "clips": ((8, 4, 64, 64, 3), np.uint8),
      "labels": ((8,), np.int32),
      "ego_score_logits": ((8, 2), np.float32),
      "object_logits": ((8, 10), np.float32),
      "interaction_map": ((8, 4, 2, 2, 2), np.float32),
      "has_ego_score": ((8,), np.float32),
      "has_object": ((8,), np.float32),
      "has_interaction": ((8,), np.float32),
      "record_index": ((8,), np.int64),  # host-only keys (stream.HOST_KEYS)
      "skipped_records": ((8,), np.int32),
  }
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert set(batch["labels"]) <= {0, 1, 2}
  assert batch["clips"].std() > 10  # real pixels, not a blank frame
  np.testing.assert_array_equal(batch["has_ego_score"], 1)
  # Record 5 has no detector output: its mask is 0 and its map all zeros; the others carry boxes.
  maps, has = batch["interaction_map"], batch["has_interaction"]
  assert not maps[has == 0].any()
  assert maps[has == 1].max() == pytest.approx(0.9, abs=1e-6)  # object boxes score 0.9
  hands = maps[..., 0]
  assert 0.6 <= hands[hands > 0].min() and hands.max() < 0.9  # hand scores are 0.6 + 0.01 t, t < 30
  assert (maps[..., 1][maps[..., 1] > 0] == np.float32(0.9)).all()  # the 0.3 object box is dropped


def test_same_seed_same_stream_other_seed_other_stream(real_record_pattern):
  config = tiny_config(real_record_pattern)
  a = take(iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID)), 3)
  b = take(iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID)), 3)
  assert_batches_equal(a, b)
  config.seed = 7
  c = take(iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID)), 3)
  assert not np.array_equal(a[0]["clips"], c[0]["clips"])


def test_resume_from_saved_iterator_state(real_record_pattern):
  config = tiny_config(real_record_pattern)
  iterator = iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID))
  take(iterator, 2)
  state = iterator.get_state()
  expected = take(iterator, 3)
  resumed = iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)


def test_worker_processes_give_the_same_stream(real_record_pattern):
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  config = tiny_config(real_record_pattern)
  serial = take(iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID)), 3)
  config.data.num_workers = 2
  iterator = iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID))
  try:
    parallel = take(iterator, 2)
    state = iterator.get_state()
    parallel.append(next(iterator))
  finally:
    iterator.close()
  assert_batches_equal(parallel, serial)
  # A state taken with workers resumes with the same number of workers (Grain's state layout
  # depends on it) at the same place.
  resumed = iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID))
  try:
    resumed.set_state(state)
    assert_batches_equal([next(resumed)], serial[2:])
  finally:
    resumed.close()


def test_hosts_get_disjoint_slices_of_each_epoch(real_record_pattern):
  config = tiny_config(real_record_pattern, global_batch_size=6)
  source = sources.open_records(real_record_pattern)
  import grain
  order = grain.MapDataset.source(range(len(source))).seed(config.seed).shuffle().repeat()
  host_items = [[order[process * 3 + i] for i in range(3)] for process in range(2)]  # rows of global batch 0
  assert sorted(host_items[0] + host_items[1]) == list(range(6))  # one epoch, split without overlap
  labels = [next(iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, process_index=p,
                                                   process_count=2, grid=GRID)))["labels"] for p in range(2)]
  assert all(len(x) == 3 for x in labels)
  np.testing.assert_array_equal(np.concatenate(labels) % 3,
                                [source[i].labels[0] for i in host_items[0] + host_items[1]])
  with pytest.raises(ValueError, match="not divisible by 4 hosts"):
    egoexo_pipeline.make_train_dataset(config, real_record_pattern, process_index=0, process_count=4, grid=GRID)


def test_records_that_do_not_fit_the_config_are_named(real_record_pattern):
  record = sources.open_records(real_record_pattern)[0]
  transform = egoexo_pipeline.egoexo_transform(
      tiny_config(real_record_pattern, **{"model.num_object_classes": 1000}), GRID)
  with pytest.raises(stream.ConfigMismatchError, match="'real_0': field 'object_logits' has 10 values"):
    transform.apply(record, None)
  transform = egoexo_pipeline.egoexo_transform(
      tiny_config(real_record_pattern, **{"model.num_classes": {"action": 0}}), GRID)
  with pytest.raises(stream.ConfigMismatchError, match="'real_0': label 0 of head 0 is outside"):
    transform.apply(record, None)
  multi = records.VideoRecord(**{**record.__dict__, "labels": np.array([1, 2])})
  with pytest.raises(stream.ConfigMismatchError, match="exactly one action label"):
    egoexo_pipeline.egoexo_transform(tiny_config(real_record_pattern), GRID).apply(multi, None)


# --------------------------------------------------------------------------- record ids and unreadable records


def test_unreadable_records_are_skipped_counted_and_named(real_record_pattern, tmp_path, caplog):
  import logging
  pattern = str(tmp_path / "mixed.tfrecord-00000-of-00001")
  unreadable = write_records_with_corrupt_ones(real_record_pattern, pattern)
  config = tiny_config(pattern)
  caplog.set_level(logging.WARNING)
  batches = take(iter(egoexo_pipeline.make_train_dataset(config, pattern, grid=GRID)), 4)
  got = [(int(i), int(s)) for b in batches for i, s in zip(b["record_index"], b["skipped_records"])]
  want = expected_positions(8, unreadable, config.seed, 32)
  assert got == want
  assert sum(s for _, s in want) > 0 and not {i for i, _ in got} & set(unreadable)
  # Each skip names the file, the record number, its index and id, and why.
  assert f"{pattern}#6 (record index 6, id 'broken_jpeg'): cannot decode: UnidentifiedImageError" in caplog.text
  assert f"{pattern}#7: corrupt record payload (data CRC mismatch) (record index 7)" in caplog.text
  # Two hosts hold the rows of the same global batches.
  hosts = [next(iter(egoexo_pipeline.make_train_dataset(config, pattern, process_index=h, process_count=2, grid=GRID)))
           for h in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["record_index"] for h in hosts]), batches[0]["record_index"])
  np.testing.assert_array_equal(np.concatenate([h["clips"] for h in hosts]), batches[0]["clips"])


def test_a_dataset_of_unreadable_records_is_an_error(real_record_pattern, tmp_path):
  pattern = str(tmp_path / "bad.tfrecord-00000-of-00001")
  write_records_with_corrupt_ones(real_record_pattern, pattern, with_real=False)
  with pytest.raises(records.RecordError, match=r"101 records in a row \(stream positions 0..100\) are unreadable"):
    next(iter(egoexo_pipeline.make_train_dataset(tiny_config(pattern), pattern, grid=GRID)))


# --------------------------------------------------------------------------- records whose content does not fit


def test_records_whose_content_does_not_fit_are_skipped_counted_and_named(real_record_pattern, tmp_path, caplog):
  import logging
  pattern = str(tmp_path / "content.tfrecord-00000-of-00001")
  bad = write_records_with_bad_content(real_record_pattern, pattern)
  config = tiny_config(pattern)
  caplog.set_level(logging.INFO)
  batches = take(iter(egoexo_pipeline.make_train_dataset(config, pattern, grid=GRID)), 4)
  got = [(int(i), int(s)) for b in batches for i, s in zip(b["record_index"], b["skipped_records"])]
  assert got == expected_positions(10, bad, config.seed, 32)  # the position rule of unreadable records
  assert sum(s for _, s in got) > 0 and not {i for i, _ in got} & set(bad)
  for batch in batches:
    assert np.all(np.isfinite(batch["interaction_map"])) and batch["interaction_map"].max() <= 1
  drawn = {i for i in bad if f"(record index {i}, id " in caplog.text}
  assert drawn  # the stream met some of them; each is named by file, number, index, id and reason
  for i in drawn:
    assert f"{pattern}#{i} (record index {i}, id '" in caplog.text and bad[i] in caplog.text
  # The check at open sampled every record (10 < data.check_records) and logged the four.
  assert "Checked 10 records against the config: 0 unreadable, 4 do not fit (skipped when drawn)" in caplog.text
  assert f"Record check at open: {pattern}#6 (record index 6): record 'bad_label': label 99 of head 0" in caplog.text


def test_data_that_does_not_fit_the_config_at_all_stops_before_the_first_step(real_record_pattern):
  config = tiny_config(real_record_pattern, **{"model.num_object_classes": 1000})
  with pytest.raises(stream.ConfigMismatchError,
                     match=r"none of the 6 records checked when opening the data fits the config, e\.g\. "
                           r".*#0 \(record index 0\): record 'real_0': field 'object_logits' has 10 values"):
    egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=GRID)


def test_damaged_shards_are_skipped_unless_data_strict(real_record_pattern, tmp_path):
  import shutil
  for i in range(2):
    shutil.copy(real_record_pattern, tmp_path / f"r.tfrecord-0000{i}-of-00002")
  with open(tmp_path / "r.tfrecord-00001-of-00002", "r+b") as f:
    f.truncate(100)  # only the first record's header survives, and it is cut
  pattern = str(tmp_path / "r.tfrecord-*")
  batch = next(iter(egoexo_pipeline.make_train_dataset(tiny_config(pattern), pattern, grid=GRID)))
  assert batch["record_index"].max() < 6  # only shard 0's six records are left
  with pytest.raises(records.RecordError, match=r"r\.tfrecord-00001-of-00002#0: truncated record"):
    egoexo_pipeline.make_train_dataset(tiny_config(pattern, **{"data.strict": True}), pattern, grid=GRID)


def test_a_workdir_with_glob_characters_and_commas_in_its_name(real_record_pattern, tmp_path):
  """prepare_records' '<workdir>/records/train.tfrecord-*' under a workdir named 'run[1],b'."""
  import shutil
  folder = tmp_path / "run[1],b" / "records"
  folder.mkdir(parents=True)
  shutil.copy(real_record_pattern, folder / "train.tfrecord-00000-of-00001")
  pattern = str(folder / "train.tfrecord-*")
  batch = next(iter(egoexo_pipeline.make_train_dataset(tiny_config(pattern), pattern, grid=GRID)))
  assert batch["clips"].shape[0] == 8 and batch["record_index"].max() < 6
