"""Rows of the CSV files users hand us (manifests, narration lists), with errors that name the line."""

from __future__ import annotations

import csv
from typing import Iterator, Sequence


def read_csv_rows(path: str, required_columns: Sequence[str],
                  error_type: type[Exception]) -> Iterator[tuple[int, str, dict[str, str]]]:
  """Yields (line number, 'file:line', fields) for each data row of a CSV file with a header.

  Column names are stripped of spaces; a byte-order mark (spreadsheets write one) is skipped. A
  header without a required column, or a row with more values than columns, raises `error_type`
  naming the file and line.
  """
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    for required in required_columns:
      if required not in columns:
        raise error_type(f"{path}:1: the header {columns} has no '{required}' column")
    reader.fieldnames = columns
    for fields in reader:
      where = f"{path}:{reader.line_num}"
      if None in fields:
        raise error_type(f"{where}: more values than header columns")
      yield reader.line_num, where, fields
