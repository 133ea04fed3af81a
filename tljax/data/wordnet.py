"""Two offline text sources from WordNet 3.0 nouns with one label space: what kind of thing a noun names.

`wordnet_lexnames` (LEXNAMES): a noun synset's definition, labelled with its lexicographer file.
`wordnet_examples` (EXAMPLES): the usage-example sentences of the same synsets with the same labels, one record per
sentence; synsets without examples add nothing. Definitions -> usage sentences is a real domain shift over a shared
label space (26 classes, "noun.Tops", "noun.act", ... "noun.time" in lex_filenum order).

    split        wordnet_lexnames   wordnet_examples
    train                  65,672              9,102
    validation              8,319              1,168
    test                    8,124              1,199

Records are `{"text": str, "label": int}`. The text is the definition alone, without the lemma words: a lemma often
gives the class away ("oak: ..." is noun.plant), and a definition-only task asks a model to read. A synset's split
is fixed by a hash of its offset (see `experiments/make_wordnet_data.py`), so a synset's definition and its examples
are always in the same split. All 26 classes occur in every split of both sources (the rarest in train:
noun.motive, 36 definitions and 14 examples).

Nothing is dropped (no definition or example is empty after stripping) and nothing is de-duplicated: 380
definitions are shared by more than one synset (1,011 synsets; "a genus of bacteria" by 23), 150 of them across
splits, so 94 validation and 88 test definitions also occur verbatim in train; 8 shared definitions carry two labels.
7 example sentences occur twice; one ("denizens of the deep") is in train and test, with two labels.

Data: the noun synsets of WordNet 3.0 (Princeton University), read from Debian's wordnet-base and shipped as
`assets/wordnet_nouns.jsonl.xz` (3.1 MB) under the WordNet 3.0 license (`assets/WORDNET_LICENSE`), so no WordNet
install is needed at run time. Rebuild it with `python -m experiments.make_wordnet_data`.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import lzma
from importlib.resources.abc import Traversable

import numpy as np

from tljax.data.records import ArrayRecords, SourceInfo, SourceUnavailable, Split

ASSET = "wordnet_nouns.jsonl.xz"
SPLITS = ("train", "validation", "test")
ABOUT = "WordNet 3.0 nouns, Princeton University; WordNet 3.0 license (tljax/data/assets/WORDNET_LICENSE)"
PROVIDER = f"tljax itself (tljax/data/assets/{ASSET}); rebuild with `python -m experiments.make_wordnet_data`"
# Which asset column holds the texts of each source, and whether it holds one text or a list.
_TEXT_COLUMN = {"wordnet_lexnames": ("definition", False), "wordnet_examples": ("examples", True)}


def asset_path() -> Traversable:
    """The shipped asset, found through the package so it works from a wheel as well as a checkout."""
    return importlib.resources.files("tljax.data") / "assets" / ASSET


def available() -> bool:
    """Whether the asset is present (cheap: nothing is read)."""
    return asset_path().is_file()


@functools.lru_cache(maxsize=1)
def read_asset() -> tuple[dict, dict[str, tuple]]:
    """(metadata, column name -> one value per synset in data.noun order), parsed once per process.

    Raises:
      SourceUnavailable: the asset is missing (a broken install).
    """
    if not available():
        raise SourceUnavailable(f"WordNet asset {ASSET} is missing; it ships with {PROVIDER}")
    first, _, rest = lzma.decompress(asset_path().read_bytes()).decode("ascii").partition("\n")
    meta = json.loads(first)["meta"]
    # One json.loads over all rows is several times faster than one call per line.
    rows = json.loads("[" + rest.rstrip("\n").replace("\n", ",") + "]")
    return meta, dict(zip(meta["columns"], zip(*rows, strict=True), strict=True))


def label_names() -> tuple[str, ...]:
    """The 26 noun lexnames in lex_filenum order ("noun.Tops", "noun.act", ..., "noun.time")."""
    return tuple(name for _, name in read_asset()[0]["lexnames"])


def _texts(value: str | list[str], many: bool) -> list[str]:
    return [t.strip() for t in (value if many else [value]) if t.strip()]


@functools.cache
def _columns(source: str, split: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(texts, read-only int64 labels) of one split, built once and shared by every `load`."""
    index = {name: i for i, name in enumerate(label_names())}
    column, many = _TEXT_COLUMN[source]
    asset = read_asset()[1]
    texts, labels = [], []
    for value, lexname, in_split in zip(asset[column], asset["lexname"], asset["split"], strict=True):
        if in_split == split:
            row_texts = _texts(value, many)
            texts += row_texts
            labels += [index[lexname]] * len(row_texts)
    labels = np.asarray(labels, np.int64)
    labels.flags.writeable = False
    return tuple(texts), labels


def load(source: str, split: str) -> Split:
    """One split of a WordNet source.

    Args:
      source: "wordnet_lexnames" or "wordnet_examples".
      split: "train", "validation" or "test".

    Returns:
      A text `Split` named f"{source}:{split}" with records {"text": str, "label": int}.
    """
    if source not in _TEXT_COLUMN:
        raise ValueError(f"unknown WordNet source {source!r}; valid: {sorted(_TEXT_COLUMN)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of {source}; valid splits: {list(SPLITS)}")
    texts, labels = _columns(source, split)
    meta = read_asset()[0]
    about = f"{ABOUT}; {meta['debian_package']}; split: {meta['split_rule']}"
    records = ArrayRecords({"text": list(texts), "label": labels})
    return Split(f"{source}:{split}", records, labels, label_names(), "text", about)


LEXNAMES = SourceInfo(
    name="wordnet_lexnames",
    kind="text",
    splits={"train": 65_672, "validation": 8_319, "test": 8_124},
    num_classes=26,
    provider=PROVIDER,
    about=f"Noun definitions labelled by lexicographer file. {ABOUT}",
    load=functools.partial(load, "wordnet_lexnames"),
    available=available,
)
EXAMPLES = SourceInfo(
    name="wordnet_examples",
    kind="text",
    splits={"train": 9_102, "validation": 1_168, "test": 1_199},
    num_classes=26,
    provider=PROVIDER,
    about=f"Usage sentences of noun synsets labelled by lexicographer file. {ABOUT}",
    load=functools.partial(load, "wordnet_examples"),
    available=available,
)
