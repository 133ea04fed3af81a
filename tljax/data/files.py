"""Your own labelled text: CSV, TSV or JSON Lines files with a text column and a label column.

    train = files.text_file("train.csv")                                    # columns "text" and "label"
    test = files.text_file("test.csv", label_names=train.label_names)       # same label space as train

Labels may be names ("positive") or integers. Names are kept: the label space is the sorted set of names in the
file (or the `label_names` you pass, so validation and test files share train's), and a name outside it is an error
that names the file and line. Malformed rows (a missing column, a JSON syntax error, an empty text) are errors
with the file and line number, never skipped.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tljax.data.records import ArrayRecords, Split

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


class DataFileError(ValueError):
    """A malformed row in a data file; the message names the file and the line."""


def text_file(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    name: str | None = None,
) -> Split:
    """Reads a labelled text file into a `Split`.

    Args:
      path: a .csv / .tsv (header row naming the columns) or .jsonl file (one JSON object per line).
      text_column, label_column: the columns (JSON keys) holding the text and the label.
      label_names: the label space, in class-index order; None: the sorted distinct labels of this file (integer
        labels: 0..max). Pass train's `label_names` when reading validation and test files.
      name: the split's name (default "file:<path>").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path.absolute()} does not exist")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(FORMATS)}")
    rows = list(_rows(path, fmt, text_column, label_column))
    if not rows:
        raise DataFileError(f"{path}: no rows (an empty file?)")
    names, labels = _label_space(path, rows, label_names)
    texts = [text for _, text, _ in rows]
    records = ArrayRecords({"text": texts, "label": labels})
    return Split(name or f"file:{path}", records, labels, names, "text", f"user file {path.absolute()}")


def _rows(path: Path, fmt: str, text_column: str, label_column: str):
    """(line number, text, raw label) per row; malformed rows raise `DataFileError`."""
    with path.open(newline="", encoding="utf-8") as f:
        if fmt == "jsonl":
            yield from _json_rows(path, f, text_column, label_column)
        else:
            yield from _delimited_rows(path, f, "\t" if fmt == "tsv" else ",", text_column, label_column)


def _json_rows(path, f, text_column, label_column):
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
        yield _checked(path, line_no, row, text_column, label_column)


def _delimited_rows(path, f, delimiter, text_column, label_column):
    reader = csv.DictReader(f, delimiter=delimiter, strict=True)
    missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
    if missing:
        raise DataFileError(
            f"{path}, line 1: the header {reader.fieldnames} has no column {missing[0]!r}; pass "
            f"text_column=/label_column= to name the columns"
        )
    try:
        for row in reader:
            if None in row or None in row.values():  # too many or too few fields
                raise DataFileError(
                    f"{path}, line {reader.line_num}: expected {len(reader.fieldnames)} fields "
                    f"({', '.join(reader.fieldnames)}), got a row of another length"
                )
            yield _checked(path, reader.line_num, row, text_column, label_column)
    except csv.Error as e:
        raise DataFileError(f"{path}, line {reader.line_num}: {e}") from None


def _checked(path, line_no, row, text_column, label_column):
    for column in (text_column, label_column):
        if column not in row:
            raise DataFileError(f"{path}, line {line_no}: no {column!r} field in {sorted(row)}")
    text = row[text_column]
    if not isinstance(text, str) or not text.strip():
        raise DataFileError(f"{path}, line {line_no}: the text is empty or not a string ({text!r})")
    return line_no, text, row[label_column]


def _label_space(path, rows, label_names) -> tuple[tuple[str, ...], np.ndarray]:
    raw = [label for _, _, label in rows]
    if label_names is None:
        label_names = _infer_names(path, rows)
    names = tuple(str(n) for n in label_names)
    index = {n: i for i, n in enumerate(names)}
    labels = np.empty(len(raw), np.int64)
    for i, (line_no, _, label) in enumerate(rows):
        key = str(label)
        if key not in index:
            raise DataFileError(
                f"{path}, line {line_no}: unknown label {label!r}; the label space is {list(names)[:20]}"
                + (" ..." if len(names) > 20 else "")
            )
        labels[i] = index[key]
    return names, labels


def _infer_names(path, rows) -> list[str]:
    """Integer labels -> "0".."max"; names -> sorted distinct names."""
    raw = [label for _, _, label in rows]
    as_int = [_as_int(x) for x in raw]
    if all(v is not None for v in as_int):
        bad = next(((ln, v) for (ln, _, _), v in zip(rows, as_int, strict=True) if v < 0), None)
        if bad:
            raise DataFileError(f"{path}, line {bad[0]}: negative integer label {bad[1]}")
        return [str(i) for i in range(max(as_int) + 1)]
    return sorted({str(x) for x in raw})


def _as_int(x) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return None
