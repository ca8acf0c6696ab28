"""Assembly101 readers: per-view LMDB TSM stores written here in the released key layout, and the
fine-grained / coarse annotation files in their column layouts."""

import lmdb
import numpy as np
import pytest

from egoexo_jax.downstream import annotations
from egoexo_jax.input import assembly101, feature_records

SEQUENCE = "nusar-2021_action_both_9011-a01_9011_user_id_2021-02-01_153724"
OTHER = "nusar-2021_action_both_9033-a30_9033_user_id_2021-02-04_131528"
EGO, EXO, EXO2 = "HMC_84346135_mono10bit", "C10118_rgb", "C10404_rgb"


def write_store(root, view, frames_by_sequence):
  """One view's LMDB as Assembly101 ships it: '{seq}/{view}/{view}_{frame:010d}.jpg' -> float32 bytes."""
  env = lmdb.open(str(root / view), map_size=1 << 26)
  with env.begin(write=True) as txn:
    for sequence, frames in frames_by_sequence.items():
      for number, feature in frames.items():
        key = f"{sequence}/{view}/{view}_{number:010d}.jpg"
        txn.put(key.encode("utf-8"), np.asarray(feature, np.float32).tobytes())
  env.close()


def features_for(rng, numbers, dim=assembly101.TSM_FEATURE_DIM):
  return {n: rng.normal(size=dim).astype(np.float32) for n in numbers}


@pytest.fixture
def stores(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "TSM_features"
  root.mkdir()
  data = {
      EGO: {SEQUENCE: features_for(rng, range(1, 13)), OTHER: features_for(rng, range(1, 7))},
      EXO: {SEQUENCE: features_for(rng, range(1, 12)), OTHER: features_for(rng, range(1, 7))},  # one frame short
      EXO2: {SEQUENCE: features_for(rng, [n for n in range(1, 13) if n != 5])},  # frame 5 missing
  }
  for view, frames in data.items():
    write_store(root, view, frames)
  return root, data


def test_lmdb_stores_become_feature_records(stores, tmp_path):
  root, data = stores
  prefix = str(tmp_path / "records" / "a101")
  index = assembly101.convert_lmdb_features(str(root), prefix, dtype="float32", npy_dir=str(tmp_path / "npy"),
                                            formats=("tfrecord", "array_record"), chunk_frames=8)
  assert index["feature_dim"] == 2048 and index["num_recordings"] == 2
  source = feature_records.FeatureRecordSource(prefix, "array_record")
  by_recording = {}
  for i in range(len(source)):
    record = source[i]
    by_recording.setdefault(record.recording_id, []).append(record)
  # The views are folders in name order; the ego camera is 'ego', the fixed ones 'exo'.
  first = by_recording[SEQUENCE]
  assert [r.first_frame for r in first] == [0, 8] and [r.num_frames for r in first] == [8, 3]  # 11 common frames
  assert first[0].view_names == [EXO, EXO2, EGO] and first[0].view_kinds == ["exo", "exo", "ego"]
  features = np.concatenate([r.features for r in first], axis=1)
  for v, view in enumerate(first[0].view_names):
    for t in range(11):  # record frame t is key t + 1
      want = data[view][SEQUENCE].get(t + 1, data[view][SEQUENCE].get(t))  # missing frame 5: frame 4 repeated
      np.testing.assert_array_equal(features[v, t], want)
  other = by_recording[OTHER][0]
  assert other.view_names == [EXO, EGO] and other.num_frames == 6  # EXO2 does not hold it
  np.testing.assert_array_equal(other.features[1, 2], data[EGO][OTHER][3])
  npy = np.load(tmp_path / "npy" / SEQUENCE / f"{EGO}.npy")
  assert npy.shape == (11, 2048) and npy.dtype == np.float32
  np.testing.assert_array_equal(npy[10], data[EGO][SEQUENCE][11])


def test_bad_stores_are_named(stores, tmp_path):
  root, _ = stores
  with pytest.raises(assembly101.Assembly101Error, match="more than 0 frames differ"):
    next(assembly101.recordings(str(root), sequences=[SEQUENCE], max_length_difference=0))
  with pytest.raises(assembly101.Assembly101Error, match="no view holds sequence 'nope'"):
    next(assembly101.recordings(str(root), sequences=["nope"]))
  write_store(root, "C10095_rgb", {SEQUENCE: {1: np.zeros(100, np.float32)}})
  with pytest.raises(assembly101.Assembly101Error, match=r"C10095_rgb_0000000001.jpg' holds 400 bytes, not 2048"):
    next(assembly101.recordings(str(root), views=["C10095_rgb", EGO]))
  with pytest.raises(assembly101.Assembly101Error, match="neither a head-mounted camera"):
    assembly101.view_kind("depth_cam")


def test_fine_grained_csvs_become_segments_and_splits(tmp_path):
  header = ("id,video,start_frame,end_frame,action_id,verb_id,noun_id,action_cls,verb_cls,noun_cls,toy_id,toy_name,"
            "is_shared,is_RGB\n")
  rows = [f"0,{SEQUENCE}/C10118_rgb.mp4,84,111,10,18,27,clap hand,clap,hand,a01,excavator,1,1",
          f"1,{SEQUENCE}/HMC_84346135_mono10bit.mp4,84,111,10,18,27,clap hand,clap,hand,a01,excavator,1,0",
          f"2,{SEQUENCE}/C10118_rgb.mp4,5,40,380,7,22,remove excavator arm,remove,excavator arm,a01,excavator,1,1"]
  (tmp_path / "train.csv").write_text(header + "\n".join(rows) + "\n")
  (tmp_path / "validation.csv").write_text(header + f"0,{OTHER}/C10404_rgb.mp4,3,9,1,2,3,a,b,c,a30,suv,0,1\n")
  segments, splits = assembly101.read_fine_grained([str(tmp_path / "train.csv"), str(tmp_path / "validation.csv")])
  assert segments[SEQUENCE] == [assembly101.Segment(5, 40, 380, 7, 22), assembly101.Segment(84, 111, 10, 18, 27)]
  assert splits == {SEQUENCE: "train", OTHER: "val"}
  assembly101.write_segments(str(tmp_path / "segments.csv"), segments)
  assembly101.write_split(str(tmp_path / "split.csv"), splits)
  read = annotations.read_segments(str(tmp_path / "segments.csv"))  # the downstream tasks read them as they are
  assert [(s.start, s.end, s.action, s.verb, s.object) for s in read[SEQUENCE]] == [(5, 40, 380, 7, 22),
                                                                                     (84, 111, 10, 18, 27)]
  assert annotations.read_split(str(tmp_path / "split.csv"))["val"] == [OTHER]
  (tmp_path / "bad.csv").write_text(header + f"0,{SEQUENCE}/C10118_rgb.mp4,84,x,10,18,27,a,b,c,a,b,1,1\n")
  with pytest.raises(assembly101.Assembly101Error, match=r"bad.csv:2: column 'end_frame' is 'x'"):
    assembly101.read_fine_grained([str(tmp_path / "bad.csv")])


def test_coarse_labels_actions_and_splits(tmp_path):
  (tmp_path / "actions.csv").write_text("action_id,verb_id,noun_id,action_cls,verb_cls,noun_cls\n"
                                        "21,0,11,attach arm connector,attach,arm connector\n"
                                        "3,4,5,attempt to screw chassis,attempt to screw,chassis\n")
  labels = tmp_path / "coarse_labels"
  labels.mkdir()
  (labels / f"assembly_{SEQUENCE}.txt").write_text("000000010\t000000050\tattach arm connector\n"
                                                   "000000050\t000000090\tattempt to screw chassis\n")
  (labels / f"disassembly_{SEQUENCE}.txt").write_text("000000200\t000000260\tattach arm connector\n")
  splits_dir = tmp_path / "coarse_splits"
  splits_dir.mkdir()
  (splits_dir / "train_coarse_assembly.txt").write_text(f"assembly_{SEQUENCE}.txt\tshared\ta01\texcavator\n")
  (splits_dir / "test_coarse_disassembly.txt").write_text(f"disassembly_{OTHER}.txt\tnotshared\n")
  segments = assembly101.read_coarse_labels(str(labels), assembly101.read_coarse_actions(str(tmp_path / "actions.csv")))
  assert segments == {SEQUENCE: [assembly101.Segment(10, 50, 21, 0, 11), assembly101.Segment(50, 90, 3, 4, 5),
                                 assembly101.Segment(200, 260, 21, 0, 11)]}
  assert assembly101.read_coarse_splits(str(splits_dir)) == {SEQUENCE: "train", OTHER: "test"}
  (labels / f"assembly_{OTHER}.txt").write_text("000000010\t000000050\tfly away\n")
  with pytest.raises(assembly101.Assembly101Error, match=r"assembly_.*9033.*\.txt:1: action 'fly away' is not"):
    assembly101.read_coarse_labels(str(labels), assembly101.read_coarse_actions(str(tmp_path / "actions.csv")))
