"""Records, or convert once (input/prepared_records.py)."""

import os

import ml_collections
import pytest

from egoexo_jax.input import prepared_records


def test_a_set_pattern_is_used_and_a_manifest_is_converted_only_once(tmp_path):
  calls = []

  def convert(prefix):
    calls.append(prefix)
    open(prefix + ".json", "w").close()  # what a finished conversion leaves

  assert prepared_records.records_or_convert("/data/x.tfrecord-*", str(tmp_path / "p"), convert) == "/data/x.tfrecord-*"
  assert calls == []
  prefix = str(tmp_path / "p")
  assert prepared_records.records_or_convert("", prefix, convert) == prefix + ".tfrecord-*"
  assert prepared_records.records_or_convert("", prefix, convert, suffix="") == prefix
  assert calls == [prefix]  # the second call found <prefix>.json


def test_each_caller_names_its_folder_and_its_missing_keys(tmp_path):
  config = ml_collections.ConfigDict({"data": {"ego_records": "", "ego_manifest": "", "exo_records": "/e/*",
                                                "feature_records": "", "view_manifest": "v.csv"}})
  assert prepared_records.view_records(config, str(tmp_path), "exo") == "/e/*"
  with pytest.raises(ValueError, match="config data.ego_records and data.ego_manifest are both empty"):
    prepared_records.view_records(config, str(tmp_path), "ego")
  with pytest.raises(ValueError, match="no records to evaluate: pass --records"):
    prepared_records.eval_records(config, str(tmp_path), "")
  os.makedirs(tmp_path / "feature_records")
  open(tmp_path / "feature_records" / "train.json", "w").close()  # converted before: nothing to do
  assert prepared_records.feature_records(config, str(tmp_path)) == str(tmp_path / "feature_records" / "train")
