"""The one label encoder (input/labels.py) against hand-worked targets."""

import ml_collections
import numpy as np
import pytest

from egoexo_jax.input import labels, stream


def heads(*sizes):
  return labels.head_sizes(sizes, key="model.num_classes", layout_key="data.label_layout")


def test_label_encodings():
  np.testing.assert_array_equal(labels.encode_labels(np.array([3, 7]), heads(5, 10), "single", "r"), [3, 7])
  np.testing.assert_array_equal(labels.encode_labels(np.array([1, 6]), heads(5, 3), "multi_label", "r"),
                                [0, 1, 0, 0, 0, 0, 1, 0])
  with pytest.raises(ValueError, match="record 'x': label 5 of head 0 is outside"):
    labels.encode_labels(np.array([5]), heads(5), "single", "record 'x'")
  with pytest.raises(ValueError, match="need one class per head"):
    labels.encode_labels(np.array([1]), heads(5, 3), "single", "record 'x'")


def test_single_labels_in_the_concatenated_class_space_lose_their_offsets():
  epic = (("verb", 97), ("noun", 300))
  target = labels.encode_labels([5, 97 + 12], epic, "single", "r", concatenated_ids=True)
  assert target.dtype == np.int32 and target.tolist() == [5, 12]
  with pytest.raises(stream.ConfigMismatchError, match=r"label 12 of head 1 is outside \[97, 397\)"):
    labels.encode_labels([5, 12], epic, "single", "r", concatenated_ids=True)
  # The same ids per head (SUM-L's records) are taken as they are.
  assert labels.encode_labels([5, 12], epic, "single", "r").tolist() == [5, 12]


def test_multi_hot_targets_and_errors_name_the_record_and_the_config_key():
  target = labels.encode_labels([2, 0, 2], (("action", 4),), "multi_label", "record 'v'")
  assert target.dtype == np.float32 and target.tolist() == [1, 0, 1, 0]
  assert labels.encode_labels([], (("action", 4),), "multi_label", "r").tolist() == [0, 0, 0, 0]
  with pytest.raises(stream.ConfigMismatchError, match=r"record 'v': labels \[4\] are not all in \[0, 4\) \(config "
                                                       r"model.exo_num_classes"):
    labels.encode_labels([4], (("action", 4),), "multi_label", "record 'v'", key="model.exo_num_classes")
  with pytest.raises(stream.ConfigMismatchError, match="exactly one action label per video"):
    labels.encode_labels([1, 2], (("action", 4),), "single", "r")
  with pytest.raises(ValueError, match="unknown label kind 'multi'"):
    labels.encode_labels([1], (("action", 4),), "multi", "r")


def test_head_sizes_from_ints_sequences_and_config_dicts():
  kw = dict(key="model.num_classes", layout_key="data.label_layout")
  assert labels.head_sizes(5, **kw) == (("action", 5),)
  assert labels.head_sizes((97, 300), **kw) == (("0", 97), ("1", 300))
  config = ml_collections.ConfigDict({"counts": {"verb": 97, "noun": 300}})  # its keys come back sorted
  assert labels.head_sizes(config.counts, ("verb", "noun"), **kw) == (("verb", 97), ("noun", 300))
  with pytest.raises(ValueError, match="config data.label_layout must give their order"):
    labels.head_sizes(config.counts, **kw)
  with pytest.raises(ValueError, match="name different heads"):
    labels.head_sizes(config.counts, ("verb", "action"), **kw)
