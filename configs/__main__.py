"""`python -m configs`: every config file, the arguments it takes and its docstring's first line.

A config runs as `python main.py --config=configs/<file>.py[:<argument>]`; the argument is
comma-separated (configs/common.py). Files without `get_config` (the recipe tables, shared parts) are
not listed.
"""

import importlib
import pathlib
import sys

from configs import common

CONFIG_DIR = pathlib.Path(__file__).resolve().parent


def config_names() -> list[str]:
  """The stems of the config files that define get_config, in name order."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                if not p.stem.startswith("_") and "def get_config(" in p.read_text(encoding="utf-8"))


def describe(name: str) -> list[str]:
  module = importlib.import_module(f"configs.{name}")
  spec = getattr(module, "ARG", common.ArgSpec())
  first_line = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else "(no docstring)"
  return [f"configs/{name}.py", f"    {first_line}", f"    arguments: {spec.valid()}"]


def main() -> int:
  root = str(CONFIG_DIR.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  print("Configs (python main.py --config=configs/<file>.py[:<comma-separated arguments>]):")
  for name in config_names():
    print("\n".join(describe(name)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
