"""Datasets by name, as configs write them: `load("fashion_mnist:train")`, `load("tfds:cifar10:test")`.

    name                        what
    fashion_mnist:{train,test}  Zalando's Fashion-MNIST (Debian dataset-fashion-mnist)
    digits:{train,test}         scikit-learn's bundled 8x8 digits
    wordnet_lexnames:{train,validation,test}   WordNet noun definitions -> lexicographer file (ships with tljax)
    wordnet_examples:{train,validation,test}   usage sentences of the same synsets, same labels (domain shift)
    tfds:<name>:<split>         any TFDS dataset prepared as ArrayRecord (see `tljax.data.tfds`)
    file:<path>                 your own CSV / TSV / JSONL text file (see `tljax.data.files`)
    folder:<path>[:<split>]     your own image folder, one subfolder per class (see `tljax.data.images`)

`list_sources()` lists the registered ones with their sizes and whether they are installed here.
"""

from __future__ import annotations

from tljax.data import files, images, tfds, wordnet
from tljax.data.records import SourceInfo, SourceUnavailable, Split

SOURCES: dict[str, SourceInfo] = {
    s.name: s for s in (images.FASHION_MNIST, images.DIGITS, wordnet.LEXNAMES, wordnet.EXAMPLES)
}
PREFIXES = ("tfds", "file", "folder")


def load(spec: str, split: str | None = None, **options) -> Split:
    """The split named by `spec` ("name:split"), or by `spec` and `split`.

    Args:
      spec: a registered name with its split ("digits:train"), or "tfds:...", "file:...", "folder:..." (above).
      split: the split, when `spec` does not carry one.
      options: passed to the loader of "tfds:" (data_dir, image_key, ...) and "file:" (text_column, label_names,
        ...) specs.
    """
    prefix, _, rest = spec.partition(":")
    if prefix == "tfds":
        name, _, in_spec = rest.partition(":")
        return tfds.load(name, _one_split(spec, in_spec, split, None), **options)
    if prefix == "file":
        _no_split(spec, split)
        return files.text_file(rest, name=spec, **options)
    if prefix == "folder":
        return _folder(rest, split, spec)
    if prefix not in SOURCES:
        raise ValueError(
            f"unknown data source {prefix!r} in {spec!r}; registered: {sorted(SOURCES)}, or a prefix "
            f"{[p + ':' for p in PREFIXES]}"
        )
    if options:
        raise TypeError(f"source {prefix!r} takes no options, got {sorted(options)}")
    info = SOURCES[prefix]
    chosen = _one_split(spec, rest, split, info.splits)
    if not info.available():
        raise SourceUnavailable(f"data source {prefix!r} is not installed here: {info.provider}")
    return info.load(chosen)


def _one_split(spec: str, in_spec: str, split: str | None, valid) -> str:
    if in_spec and split and in_spec != split:
        raise ValueError(f"{spec!r} names split {in_spec!r} but split={split!r} was passed too")
    chosen = in_spec or split
    if not chosen:
        hint = f" one of {list(valid)}" if valid else ""
        raise ValueError(f"data source {spec!r} needs a split: write '{spec}:<split>' with{hint}")
    if valid is not None and chosen not in valid:
        raise ValueError(f"unknown split {chosen!r} of {spec.partition(':')[0]!r}; valid splits: {list(valid)}")
    return chosen


def _no_split(spec: str, split: str | None) -> None:
    if split:
        raise ValueError(f"{spec!r} is one file, so it has no splits (got split={split!r}): name each file")


def _folder(rest: str, split: str | None, spec: str) -> Split:
    path, _, in_spec = rest.rpartition(":") if rest.count(":") else (rest, "", "")
    path = path or rest
    splits = images.image_folder(path)
    if len(splits) == 1 and not (in_spec or split):
        return next(iter(splits.values()))
    return splits[_one_split(spec, in_spec, split, list(splits))]


def list_sources() -> list[dict]:
    """One row per registered source: name, kind, classes, split sizes, installed here?, provider, provenance."""
    rows = []
    for info in SOURCES.values():
        rows.append(
            {"name": info.name, "kind": info.kind, "classes": info.num_classes, "splits": dict(info.splits),
             "installed": bool(info.available()), "provider": info.provider, "about": info.about}
        )  # fmt: skip
    return rows


def format_sources(rows: list[dict] | None = None) -> str:
    """`list_sources()` as a table for a terminal."""
    rows = list_sources() if rows is None else rows
    lines = [f"{'name':<18} {'kind':<6} {'classes':>7}  {'installed':<9}  splits"]
    for r in rows:
        splits = ", ".join(f"{k} {v:,}" for k, v in r["splits"].items())
        lines.append(f"{r['name']:<18} {r['kind']:<6} {r['classes']:>7}  {str(r['installed']):<9}  {splits}")
    return "\n".join(lines)
