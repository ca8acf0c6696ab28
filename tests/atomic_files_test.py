"""Atomic writes: a file is replaced whole or not at all."""

import os

import pytest

from egoexo_jax import atomic_files


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / "out" / "file.bin"
  with atomic_files.atomic_write(str(path)) as f:
    f.write(b"first")
  with pytest.raises(RuntimeError):
    with atomic_files.atomic_write(str(path)) as f:
      f.write(b"half of the second")
      raise RuntimeError("killed mid-write")
  assert path.read_bytes() == b"first"  # the old content survives a failed write
  assert os.listdir(path.parent) == ["file.bin"]  # and no temporary is left behind
