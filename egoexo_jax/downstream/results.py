"""The downstream results table in EVGAP's layout, from the runs' results.json files (markdown + JSON).

    python -m egoexo_jax.downstream.results --runs_dir=runs/downstream --output_dir=runs/downstream \
        [--view_manifest=data/evgap/views.csv]

Reads every `results.json` under --runs_dir (segmentation.py and anticipation.py write them) and
writes `<output_dir>/results_table.md` and `results_table.json` with:
  Temporal action segmentation (EVGAP Table 1): a row per (model, features); for each view split
      ego / exo / ego+exo (two-view inputs) / ego & exo (single views of both kinds): F1@{10,25,50},
      Edit, Acc and their average (percent, test set).
  Action anticipation (Table 3): a row per (model, features); per split verb / object / action
      class-mean top-5 recall.
  Novel views (Tables 4, 5): runs whose test views were never trained on, one row each with the train
      and test views.
The split of a run is that of its test views (views.split_name). 'Features' is the run's --label, or
'+EVGAP' for the finetune protocol, or the name of its features folder; baseline rows come first, then
+EVGAP*, then +EVGAP. Runs with the same task, model, features, split and views are averaged (the JSON
gives how many).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from egoexo_jax import atomic_files
from egoexo_jax.downstream import loop, views
from egoexo_jax.downstream.annotations import AnnotationError

SEGMENTATION_METRICS = (("f1@10", "F1@10"), ("f1@25", "F1@25"), ("f1@50", "F1@50"), ("edit", "Edit"),
                        ("accuracy", "Acc"))
ANTICIPATION_METRICS = (("verb_recall@5", "Verb"), ("object_recall@5", "Object"), ("action_recall@5", "Action"))
SPLITS = ("ego", "exo", "ego+exo", "ego & exo")
TABLE = "results_table"
TASKS = {"temporal action segmentation": "segmentation", "action anticipation": "anticipation"}


def features_label(run: dict[str, Any]) -> str:
  if run.get("label"):
    return run["label"]
  if run.get("protocol") == "finetune":
    return "+EVGAP"
  return os.path.basename(os.path.normpath(run.get("features_dir", "?")))


def summarize(run: dict[str, Any], path: str, kinds: dict[str, str] | None = None) -> dict[str, Any]:
  """One run's row key and scores; an error names the file for a results.json of another shape."""
  try:
    task = TASKS[run["task"]]
    train_views, test_views, test = list(run["train_views"]), list(run["test_views"]), run["test"]
    metric_names = SEGMENTATION_METRICS if task == "segmentation" else ANTICIPATION_METRICS
    scores = {key: float(test[key]) for key, _ in metric_names}
  except (KeyError, TypeError, ValueError) as e:
    raise AnnotationError(f"{path}: not a downstream results.json ({e!r})") from e
  if task == "segmentation":
    scores["average"] = float(np.mean([scores[key] for key, _ in SEGMENTATION_METRICS]))
  return {"task": task, "model": run.get("model", "?"), "features": features_label(run),
          "split": views.split_name(test_views, kinds), "novel_view": not set(test_views) & set(train_views),
          "train_views": train_views, "test_views": test_views, "scores": scores, "path": path}


def collect(runs_dir: str, kinds: dict[str, str] | None = None) -> list[dict[str, Any]]:
  paths = sorted(glob.glob(os.path.join(runs_dir, "**", "results.json"), recursive=True))
  runs = []
  for path in paths:
    with open(path) as f:
      content = json.load(f)
    if isinstance(content, dict) and content.get("task") in TASKS:
      runs.append(summarize(content, path, kinds))
  if not runs:
    raise AnnotationError(f"no downstream results.json under '{runs_dir}'")
  return runs


def order(features: str) -> tuple[int, str]:
  """Rows as the paper's: the baseline features first, then +EVGAP* (frozen), then +EVGAP (fine-tuned)."""
  return {"+EVGAP*": 1, "+EVGAP": 2}.get(features, 0), features


def _average(group: list[dict[str, Any]]) -> dict[str, float]:
  return {key: float(np.mean([r["scores"][key] for r in group])) for key in group[0]["scores"]}


def tables(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """{'segmentation': rows, 'anticipation': rows, 'novel_view': rows}; a row per (model, features) with
  {split: averaged scores} for the first two, a row per (task, model, features, views) for novel views."""
  out: dict[str, Any] = {"segmentation": [], "anticipation": [], "novel_view": []}
  grouped: dict[tuple, list] = {}
  for run in runs:
    if run["novel_view"]:
      key = ("novel_view", run["task"], run["model"], run["features"], tuple(run["train_views"]),
             tuple(run["test_views"]))
    else:
      key = (run["task"], run["model"], run["features"], run["split"])
    grouped.setdefault(key, []).append(run)
  rows: dict[tuple, dict] = {}
  for key, group in grouped.items():
    if key[0] == "novel_view":
      out["novel_view"].append({"task": key[1], "model": key[2], "features": key[3], "train_views": list(key[4]),
                                "test_views": list(key[5]), "runs": len(group), "scores": _average(group)})
      continue
    task, model, features, split = key
    row = rows.setdefault((task, model, features), {"model": model, "features": features, "splits": {}})
    row["splits"][split] = {"runs": len(group), **_average(group)}
  for (task, _, _), row in sorted(rows.items(), key=lambda item: (item[0][0], item[0][1], *order(item[0][2]))):
    out[task].append(row)
  out["novel_view"].sort(key=lambda r: (r["task"], r["model"], *order(r["features"]), r["test_views"]))
  return out


def _number(value: float | None) -> str:
  return "-" if value is None else f"{value:.1f}"


def markdown(table: dict[str, Any]) -> str:
  lines = []
  for task, title, metric_names in (
      ("segmentation", "Temporal action segmentation (test, %)", SEGMENTATION_METRICS + (("average", "Avg"),)),
      ("anticipation", "Action anticipation: class-mean top-5 recall (test, %)", ANTICIPATION_METRICS)):
    rows = table[task]
    if not rows:
      continue
    splits = [s for s in SPLITS if any(s in r["splits"] for r in rows)]
    splits += sorted({s for r in rows for s in r["splits"]} - set(splits))
    lines += [f"### {title}", ""]
    lines.append("| Model | Features | " + " | ".join(f"{s}: {name}" for s in splits for _, name in metric_names) + " |")
    lines.append("|---|---|" + "---:|" * (len(splits) * len(metric_names)))
    for row in rows:
      cells = [_number(row["splits"].get(s, {}).get(key)) for s in splits for key, _ in metric_names]
      lines.append(f"| {row['model']} | {row['features']} | " + " | ".join(cells) + " |")
    lines.append("")
  if table["novel_view"]:
    lines += ["### Novel views (test views never trained on; test, %)", "",
              "| Task | Model | Features | Train views | Test views | Scores |", "|---|---|---|---|---|---|"]
    for row in table["novel_view"]:
      names = dict(SEGMENTATION_METRICS + ANTICIPATION_METRICS + (("average", "Avg"),))
      scores = ", ".join(f"{names[k]} {_number(v)}" for k, v in row["scores"].items())
      lines.append(f"| {row['task']} | {row['model']} | {row['features']} | {', '.join(row['train_views'])} | "
                   f"{', '.join(row['test_views'])} | {scores} |")
    lines.append("")
  return "\n".join(lines)


def write(runs_dir: str, output_dir: str, view_manifest: str = "") -> dict[str, Any]:
  kinds = views.read_kinds(view_manifest) if view_manifest else None
  runs = collect(runs_dir, kinds)
  table = tables(runs)
  os.makedirs(output_dir, exist_ok=True)
  loop.write_json(os.path.join(output_dir, TABLE + ".json"), {**table, "runs": runs})
  with atomic_files.atomic_write(os.path.join(output_dir, TABLE + ".md"), "w") as f:
    f.write(markdown(table))
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  table = write(f.runs_dir, f.output_dir or f.runs_dir, f.view_manifest)
  print(markdown(table))


if __name__ == "__main__":
  flags.DEFINE_string("runs_dir", None, "Folder searched (recursively) for the runs' results.json.")
  flags.DEFINE_string("output_dir", "", "Where results_table.md and results_table.json go (default: --runs_dir).")
  flags.DEFINE_string("view_manifest", "", "Optional recording,view,kind manifest naming each view's kind.")
  flags.mark_flags_as_required(["runs_dir"])
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
