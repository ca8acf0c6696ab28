"""Recipes as data: rows of (setting, config key, value per recipe, source per recipe, divergence).

A recipe module (configs/recipe_egoexo.py, configs/recipe_suml.py) holds a tuple of `Row`s.
`get_config()` calls `apply_recipe(config, ROWS, recipe, config_name, small=...)` to set every row's
value, and tests (recipes_test.py, suml_test.py) read the same rows to check each built config against
them, so the table, the configs and the README's recipe sections cannot drift apart silently.

Recipes: 'released' (what produced the authors' checkpoints: their released configs and code) and
'paper' (the text). A row whose paper column says "not stated" takes the released value under both.
`divergence` is empty when the config follows the source; otherwise it says where and why not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from configs.common import RECIPES


@dataclasses.dataclass(frozen=True)
class Row:
  """One setting of a recipe table.

  configs: the config names (file stems, e.g. 'egoexo', 'finetune_epic100') whose get_config() sets it;
    () for a row that is no config field (a flag of a tool, e.g. SUM-L's pair miner).
  key: the dotted config key ('loss.weight_action'). released / paper: the value each recipe sets.
  full_size_only: True when `:small` keeps the config's own laptop-sized value (epochs, batch, LR).
  ours: values used instead of a column, by recipe or 'small' ({'small': 8}); `divergence` says why.
  """

  setting: str
  configs: tuple[str, ...]
  key: str
  released: Any
  released_source: str
  paper: Any
  paper_source: str
  divergence: str = ""
  full_size_only: bool = False
  ours: dict = dataclasses.field(default_factory=dict)

  @property
  def source(self) -> str:
    """Both columns' sources: one text when they are the same."""
    if self.released_source == self.paper_source:
      return self.released_source
    return f"{self.released_source} / {self.paper_source}"

  def value(self, recipe: str, small: bool = False) -> Any:
    """The value the config takes under `recipe` (and at the CPU size when `small`)."""
    if recipe not in RECIPES:
      raise ValueError(f"unknown recipe '{recipe}': use one of {RECIPES}")
    if small and "small" in self.ours:
      return self.ours["small"]
    return self.ours.get(recipe, self.released if recipe == "released" else self.paper)


def rows_for(rows: tuple[Row, ...], config_name: str, *, small: bool = False) -> tuple[Row, ...]:
  """The rows that `config_name` sets (without the full-size-only ones when `small`)."""
  return tuple(r for r in rows if config_name in r.configs and not (small and r.full_size_only))


def get_key(config, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def apply_recipe(config, rows: tuple[Row, ...], recipe: str, config_name: str, *, small: bool = False):
  """Sets every row of `config_name` to its `recipe` value (full-size-only rows skipped when `small`)."""
  for row in rows_for(rows, config_name, small=small):
    *path, leaf = row.key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = row.value(recipe, small)
  config.recipe = recipe
  return config


def markdown_table(rows: tuple[Row, ...]) -> str:
  """The rows as the Markdown table of the README's "Recipes" section (tests check the README holds it)."""
  lines = ["| setting | configs | key | released | paper | source: released / paper | divergence |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.setting}{' (full size)' if r.full_size_only else ''} | {', '.join(r.configs)} | "
                 f"`{r.key}` | {_show(r.released)} | {_show(r.paper)} | {r.released_source} / {r.paper_source} | "
                 f"{r.divergence} |")
  return "\n".join(lines)


def _show(value: Any) -> str:
  return f"`{value!r}`" if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else f"{value}"
