"""Recipes as data: rows of (setting, config key, value per recipe, source per recipe, divergence).

A recipe module (configs/recipe_egoexo.py; configs/recipe_suml.py mirrors it) holds a tuple of `Row`s.
`get_config()` calls `apply_recipe(config, ROWS, recipe, config_name, small=...)` to set every row's
value, and tests/recipes_test.py reads the same rows to check each built config against them, so the
table, the configs and the README's "Recipes" section cannot drift apart silently.

Recipes: 'released' (what produced the authors' checkpoints: their released configs and code) and
'paper' (the text). A row whose paper column says "not stated" takes the released value under both.
`divergence` is empty when the config follows the source; otherwise it says where and why not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RECIPES = ("released", "paper")


@dataclasses.dataclass(frozen=True)
class Row:
  """One setting of a recipe table.

  configs: the config names (file stems, e.g. 'egoexo', 'finetune_epic100') whose get_config() sets it.
  key: the dotted config key ('loss.weight_action'). released / paper: the value each recipe sets.
  full_size_only: True when `:small` replaces the value by a laptop-sized one (epochs, batch, LR).
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

  def value(self, recipe: str) -> Any:
    if recipe not in RECIPES:
      raise ValueError(f"unknown recipe '{recipe}': use one of {RECIPES}")
    return self.released if recipe == "released" else self.paper


def parse_options(arg: str, config_file: str, allowed: tuple[str, ...], default_recipe: str) -> tuple[set[str], str]:
  """`arg` of `--config=<file>:<arg>`, comma-separated -> (the non-recipe options, the recipe).

  At most one of RECIPES may be named; none gives `default_recipe`. Unknown options are an error naming
  the file and what it accepts.
  """
  options = [a for a in arg.split(",") if a]
  unknown = sorted(set(options) - set(allowed) - set(RECIPES))
  if unknown:
    named = f"argument '{unknown[0]}'" if len(unknown) == 1 else f"arguments {unknown}"
    raise ValueError(f"unknown config {named}: {config_file} takes a comma-separated subset of "
                     f"{list(allowed)} and at most one recipe of {list(RECIPES)} (default '{default_recipe}')")
  recipes = [o for o in options if o in RECIPES]
  if len(recipes) > 1:
    raise ValueError(f"{config_file}: name at most one recipe, got {recipes}")
  return {o for o in options if o not in RECIPES}, (recipes[0] if recipes else default_recipe)


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
    node[leaf] = row.value(recipe)
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
