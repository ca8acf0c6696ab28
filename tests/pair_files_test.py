"""The pair-file format and the pair table the SUM-L pipeline draws partners from (input/pair_files.py)."""

import numpy as np
import pytest

from egoexo_jax.input import pair_files


def pair_file(**changes):
  unit = np.eye(3, dtype=np.float32)
  fields = dict(ego_ids=np.array(["e0", "e1"]), exo_ids=np.array(["x0", "x1", "x2"]),
                ego_narrations=np.array(["cut a lemon", "ride"]), exo_narrations=np.array(["a", "b", "c"]),
                ego_embeddings=unit[:2], exo_embeddings=unit, pair_indices=np.array([[2, 0], [1, 2]], np.int32),
                pair_similarities=np.array([[0.9, 0.1], [0.8, 0.2]], np.float32), model="m", k=2)
  return pair_files.PairFile(**{**fields, **changes})


def test_a_pair_file_round_trips_and_becomes_a_pair_table(tmp_path):
  path = str(tmp_path / "p.npz")
  pair_files.save_pairs(path, pair_file())
  loaded = pair_files.load_pairs(path)
  assert loaded.pairs_for("e1") == [("x1", pytest.approx(0.8)), ("x2", pytest.approx(0.2))]
  assert loaded.mining == "narration" and loaded.pair_counts is None
  table = pair_files.load_pair_table(path)
  assert table.k == 2 and table.row("e1") == 1 and table.candidates.tolist() == [[2, 0], [1, 2]]
  assert table.ego_text.shape == (2, 3) and table.counts is None
  with pytest.raises(pair_files.PairingError, match="ego clip 'e9' has no row in the pair file"):
    table.row("e9")
  labelled = pair_file(mining="labels", pair_counts=np.array([1, 2], np.int32), pair_rules=np.array([2, 0], np.int8))
  pair_files.save_pairs(path, labelled)
  assert pair_files.load_pair_table(path).counts.tolist() == [1, 2]


def test_broken_pair_files_are_named(tmp_path):
  path = str(tmp_path / "p.npz")
  pair_files.save_pairs(path, pair_file(pair_indices=np.array([[2, 0], [1, 3]], np.int32)))
  with pytest.raises(pair_files.PairFileError, match=r"p\.npz: pair_indices outside \[0, 3\)"):
    pair_files.load_pairs(path)
  np.savez(str(tmp_path / "q.npz"), ego_ids=np.array(["e0"]))
  with pytest.raises(pair_files.PairFileError, match=r"q\.npz: not a narration pair file; missing fields"):
    pair_files.load_pairs(str(tmp_path / "q.npz"))
  with pytest.raises(pair_files.PairingError, match="must be a narration pair file"):
    pair_files.load_pair_table(str(tmp_path / "pairs.txt"))


def test_true_pair_csv_errors_name_the_line(tmp_path):
  csv = tmp_path / "pairs.csv"
  csv.write_text("ego_id,exo_id\ne0,x0\ne1,x0\n")
  table = pair_files.load_pair_table(str(csv))
  assert table.candidates[:, 0].tolist() == [0, 0] and table.exo_ids.tolist() == ["x0"] and table.ego_text is None
  csv.write_text("ego_id,exo_id\ne0,x0\ne0,x1\n")
  with pytest.raises(pair_files.PairingError, match="ego clip 'e0' is paired twice"):
    pair_files.load_pair_table(str(csv))
