"""Your own labelled text: CSV, TSV or JSON Lines files with a text column and a label column.

    train = files.text_file("train.csv")                                    # columns "text" and "label"
    test = files.text_file("test.csv", label_names=train.label_names)       # same label space as train

Labels may be names ("positive") or integers. Names are kept: the label space is the sorted set of names in the
file (or the `label_names` you pass, so validation and test files share train's), and a name outside it is an error
that names the file and line. Integer labels are class indices 0..max, and every class in 0..max needs an example:
1-based labels or codes (404, 500) are an error asking for `label_names`, never a silent empty output class.
Whitespace around a label is not part of it; JSON's 1 and 1.0 are one number, its true/false the names "true" and
"false"; two spellings of one number in a file ("1" and "1.0") are an error. Malformed rows (a missing column, a
JSON syntax error, an empty text, an empty or null label) are errors with the file and line number, never skipped.

Files are UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8"). CSV fields may be quoted (RFC 4180). TSV
has no quoting (the IANA text/tab-separated-values format, GLUE's and SST's files, pandas' quoting=csv.QUOTE_NONE):
a tab ends a field, a newline ends a row and quotes are text, so a raw corpus whose text starts with `"` reads
as written. Write TSVs that way (pandas: `to_csv(sep="\t", quoting=csv.QUOTE_NONE)`), or quoted ones as .csv.
"""

from __future__ import annotations

import csv
import json
import math
import re
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
        labels: 0..max, each with an example). Pass train's `label_names` when reading validation and test files,
        and e.g. ["1", "2", "3"] to read 1-based integer labels as names.
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
    """(line number, text, label as a name) per row; malformed rows raise `DataFileError`."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is no text
            if fmt == "jsonl":
                yield from _json_rows(path, f, text_column, label_column)
            else:
                yield from _delimited_rows(path, f, fmt, text_column, label_column)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> DataFileError:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")  # a byte-order mark is valid UTF-8, so the offset counts from the file's start
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return DataFileError(
            f'{path}, line {line}: not UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8 (Excel: "CSV UTF-8")'
        )
    return DataFileError(f"{path}: not UTF-8; save the file as UTF-8")  # the file changed while it was read


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


def _delimited_rows(path, f, fmt, text_column, label_column):
    if fmt == "tsv":  # no quote processing: see the module docstring
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(f, delimiter=",", strict=True)
    rows = _numbered(path, reader)
    header_line, header = next(rows, (1, None))
    if header is None:
        return
    missing = [c for c in (text_column, label_column) if c not in header]
    if missing:
        raise DataFileError(
            f"{path}, line {header_line}: the header {header} has no column {missing[0]!r}; pass "
            f"text_column=/label_column= to name the columns"
        )
    for line_no, fields in rows:
        if len(fields) != len(header):
            raise DataFileError(
                f"{path}, line {line_no}: expected {len(header)} fields ({', '.join(header)}), got {len(fields)}"
            )
        yield _checked(path, line_no, dict(zip(header, fields, strict=True)), text_column, label_column)


def _numbered(path, reader):
    """(line the row starts on, fields) per non-blank row, so a quoted row over several lines is named by its start."""
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFileError(f"{path}, line {start}: {e}") from None
        if fields:
            yield start, fields


def _checked(path, line_no, row, text_column, label_column):
    for column in (text_column, label_column):
        if column not in row:
            raise DataFileError(f"{path}, line {line_no}: no {column!r} field in {sorted(row)}")
    text = row[text_column]
    if not isinstance(text, str) or not text.strip():
        raise DataFileError(f"{path}, line {line_no}: the text is empty or not a string ({text!r})")
    return line_no, text, _label_key(path, line_no, row[label_column])


def _label_key(path, line_no, label) -> str:
    """The label as a class name: a string without surrounding whitespace, a JSON number as Python writes it (1.0 is
    1: JSON has one number type), JSON's true/false as written."""
    if label is None:
        raise DataFileError(f"{path}, line {line_no}: the label is null; every row needs a label")
    if isinstance(label, bool):
        return "true" if label else "false"
    if isinstance(label, float) and math.isfinite(label):
        return str(int(label)) if label.is_integer() else str(label)
    if isinstance(label, int):
        return str(label)
    if not isinstance(label, str):
        raise DataFileError(f"{path}, line {line_no}: a label must be a string or a finite number, got {label!r}")
    if not label.strip():
        raise DataFileError(f"{path}, line {line_no}: the label is empty ({label!r}); every row needs a label")
    return label.strip()


def _label_space(path, rows, label_names) -> tuple[tuple[str, ...], np.ndarray]:
    keys = [key for _, _, key in rows]
    if label_names is not None:
        names = _given_names(label_names)
    elif all(_INTEGER.fullmatch(k) for k in keys):
        names, keys = _integer_space(path, rows), [str(int(k)) for k in keys]  # "02" is class 2
    else:
        names = _name_space(path, rows)
    index = {n: i for i, n in enumerate(names)}
    labels = np.empty(len(keys), np.int64)
    for i, ((line_no, _, _), key) in enumerate(zip(rows, keys, strict=True)):
        if key not in index:
            raise DataFileError(
                f"{path}, line {line_no}: unknown label {key!r}; the label space is {list(names)[:20]}"
                + (" ..." if len(names) > 20 else "")
            )
        labels[i] = index[key]
    return names, labels


_INTEGER = re.compile(r"-?[0-9]+")


def _given_names(label_names) -> tuple[str, ...]:
    names = tuple(str(n) for n in label_names)
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise ValueError(f"label_names has {twice!r} twice: give each class one name")
    return names


def _integer_space(path, rows) -> tuple[str, ...]:
    """The names 0..max, when every class in 0..max has an example: an empty one would be an output that never
    trains (4 outputs for 1-based labels 1..3, 501 for codes 404 and 500)."""
    values = [int(key) for _, _, key in rows]
    negative = next(((ln, v) for (ln, _, _), v in zip(rows, values, strict=True) if v < 0), None)
    if negative:
        raise DataFileError(f"{path}, line {negative[0]}: negative integer label {negative[1]}")
    present = sorted(set(values))
    top, empty = present[-1], present[-1] + 1 - len(present)
    if empty:
        shown = ", ".join(repr(str(v)) for v in present[:6]) + (", ..." if len(present) > 6 else "")
        raise DataFileError(
            f"{path}: integer labels are class indices, but {empty} of the {top + 1} classes 0..{top} have no "
            f"example ({_gaps(present)}). If the labels are names (1-based, codes), pass label_names=[{shown}] "
            f"(class 0 = {str(present[0])!r}); to keep the empty classes, label_names=[str(i) for i in "
            f"range({top + 1})]; or renumber the labels 0..{len(present) - 1}"
        )
    return tuple(str(i) for i in range(top + 1))


def _gaps(present: list[int], most: int = 5) -> str:
    """The integers missing from sorted `present` (from 0) as ranges: "0-403, 405-499"."""
    gaps = [(a + 1, b - 1) for a, b in zip([-1, *present], present, strict=False) if b - a > 1]
    text = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in gaps[:most]]
    return ", ".join(text) + (", ..." if len(gaps) > most else "")


def _name_space(path, rows) -> tuple[str, ...]:
    """The sorted distinct names; "1" and "1.0" in one file are one number written two ways, so an error."""
    seen: dict[float, tuple[str, int]] = {}
    for line_no, _, key in rows:
        value = _number(key)
        if value is None:
            continue
        first, first_line = seen.setdefault(value, (key, line_no))
        if first != key:
            raise DataFileError(
                f"{path}, line {line_no}: the label {key!r} is the number {first!r} of line {first_line} written "
                "another way; write each label one way"
            )
    return tuple(sorted({key for _, _, key in rows}))


def _number(key: str) -> float | None:
    try:
        value = float(key)
    except ValueError:
        return None
    return None if math.isnan(value) else value
