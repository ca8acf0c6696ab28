"""The results table from hand-made results.json files; view specs, two-view loading and split names."""

import json
import pathlib

import numpy as np
import pytest

from egoexo_jax.downstream import annotations, results, views

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "evgap"


def write_run(folder, task, model, label, train_views, test_views, test, protocol="frozen"):
  folder.mkdir(parents=True)
  (folder / "results.json").write_text(json.dumps({
      "task": task, "model": model, "label": label, "protocol": protocol, "features_dir": "/x/evgap_features",
      "train_views": train_views, "test_views": test_views, "test": test, "history": []}))


TAS = "temporal action segmentation"
ANT = "action anticipation"


def seg(f10, f25, f50, edit, acc):
  return {"f1@10": f10, "f1@25": f25, "f1@50": f50, "edit": edit, "accuracy": acc, "mean": -1.0}


def test_table_from_hand_made_runs(tmp_path):
  runs = tmp_path / "runs"
  write_run(runs / "a", TAS, "C2F-TCN", "TSM", ["ego_0", "ego_1"], ["ego_0", "ego_1"], seg(50, 40, 30, 60, 70))
  write_run(runs / "b", TAS, "C2F-TCN", "TSM", ["exo_0"], ["exo_0"], seg(10, 10, 10, 10, 10))
  write_run(runs / "c", TAS, "C2F-TCN", "TSM", ["exo_0"], ["exo_0"], seg(20, 20, 20, 20, 30))  # same cell: averaged
  write_run(runs / "d", TAS, "C2F-TCN", "", ["ego_0+exo_0"], ["ego_0+exo_0"], seg(1, 2, 3, 4, 5), protocol="finetune")
  write_run(runs / "e" / "deeper", TAS, "C2F-TCN", "TSM", ["ego_0", "exo_0"], ["exo_2"], seg(5, 5, 5, 5, 5))
  write_run(runs / "f", ANT, "TempAgg", "+EVGAP*", ["ego_0"], ["ego_0"],
            {"verb_recall@5": 80.0, "object_recall@5": 90.0, "action_recall@5": 30.0})
  (runs / "unrelated.json").write_text("{}")
  table = results.write(str(runs), str(tmp_path / "out"))

  assert [(r["model"], r["features"]) for r in table["segmentation"]] == [("C2F-TCN", "TSM"), ("C2F-TCN", "+EVGAP")]
  tsm = table["segmentation"][0]["splits"]
  assert tsm["ego"] == pytest.approx({"runs": 1, "f1@10": 50, "f1@25": 40, "f1@50": 30, "edit": 60, "accuracy": 70,
                                      "average": 50})
  assert tsm["exo"]["runs"] == 2 and tsm["exo"]["accuracy"] == pytest.approx(20)
  assert tsm["exo"]["average"] == pytest.approx((10 + 22) / 2)  # (10 x 5) / 5 and (20 x 4 + 30) / 5
  assert table["segmentation"][1]["splits"]["ego+exo"]["average"] == pytest.approx(3)
  assert table["anticipation"][0]["splits"]["ego"] == pytest.approx(
      {"runs": 1, "verb_recall@5": 80, "object_recall@5": 90, "action_recall@5": 30})
  [novel] = table["novel_view"]
  assert (novel["train_views"], novel["test_views"], novel["scores"]["average"]) == (["ego_0", "exo_0"], ["exo_2"], 5)

  md = (tmp_path / "out" / "results_table.md").read_text().splitlines()
  header = md[md.index("### Temporal action segmentation (test, %)") + 2]
  assert header.startswith("| Model | Features | ego: F1@10 | ego: F1@25 | ego: F1@50 | ego: Edit | ego: Acc | ego: Avg |")
  assert "ego+exo: Avg" in header and header.count("|") == 2 + 3 * 6 + 1
  assert "| C2F-TCN | TSM | 50.0 | 40.0 | 30.0 | 60.0 | 70.0 | 50.0 | 15.0 | 15.0 | 15.0 | 15.0 | 20.0 | 16.0 | - |" \
      in "\n".join(md)
  assert "| TempAgg | +EVGAP* | 80.0 | 90.0 | 30.0 |" in md
  assert any(line.startswith("| segmentation | C2F-TCN | TSM | ego_0, exo_0 | exo_2 | F1@10 5.0")
             for line in md)
  saved = json.loads((tmp_path / "out" / "results_table.json").read_text())
  assert len(saved["runs"]) == 6 and saved["segmentation"] == json.loads(json.dumps(table["segmentation"]))


def test_a_foreign_results_file_is_named(tmp_path):
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "results.json").write_text(json.dumps({"task": TAS, "test": {}}))
  with pytest.raises(annotations.AnnotationError, match="x/results.json: not a downstream results.json"):
    results.collect(str(tmp_path))
  with pytest.raises(annotations.AnnotationError, match="no downstream results.json"):
    results.collect(str(tmp_path / "x" / "nothing"))


def test_split_names_and_kinds(tmp_path):
  assert views.split_name(["ego_0", "ego_1"]) == "ego"
  assert views.split_name(["exo_2"]) == "exo"
  assert views.split_name(["ego_0+exo_1"]) == "ego+exo"
  assert views.split_name(["ego_0", "exo_1"]) == "ego & exo"
  assert views.split_name(["HMC_21176875_mono10bit", "C10095_rgb"]) == "ego & exo"  # Assembly101's camera names
  manifest = tmp_path / "views.csv"
  manifest.write_text("recording,view,kind,path\nr,top,exo,a.npy\nr,head,ego,b.npy\n")
  kinds = views.read_kinds(str(manifest))
  assert views.split_name(["head+top"], kinds) == "ego+exo"
  with pytest.raises(annotations.AnnotationError, match="cannot tell whether view 'top'"):
    views.split_name(["top"])
  with pytest.raises(annotations.AnnotationError, match="mix inputs of"):
    views.num_views(["ego_0", "ego_0+exo_0"])
  with pytest.raises(annotations.AnnotationError, match="bad view spec"):
    views.parse("ego_0+ego_0")


def test_two_view_sequences_concatenate_the_views_frame_by_frame():
  segments = annotations.read_segments(str(DEMO / "segments.csv"))
  [fused] = views.load(str(DEMO / "features"), segments, ["tree_r0"], ["ego_1+exo_2"])
  ego = np.load(DEMO / "features" / "tree_r0" / "ego_1.npy").astype(np.float32)
  exo = np.load(DEMO / "features" / "tree_r0" / "exo_2.npy").astype(np.float32)
  assert fused.view == "ego_1+exo_2" and fused.features.shape == (68, 256)
  np.testing.assert_array_equal(fused.features, np.concatenate([ego, exo], axis=1))
  assert fused.segments == segments["tree_r0"]
