"""The shipped WordNet sources: documented sizes and classes, a leak-free split, and an asset that rebuilds exactly."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from experiments import make_wordnet_data as make
from tljax.data import wordnet

SOURCES = (wordnet.LEXNAMES, wordnet.EXAMPLES)
NOUN_LEXNAMES = (
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
)  # fmt: skip
DATA_NOUN = pathlib.Path(make.DEFAULT_WORDNET_DIR) / "data.noun"


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_split_sizes_are_the_documented_ones(source):
    assert source.available()
    for split, size in source.splits.items():
        loaded = source.load(split)
        assert len(loaded) == len(loaded.records) == size, split
        assert loaded.name == f"{source.name}:{split}" and loaded.kind == source.kind == "text"
        assert f"{size:,}" in wordnet.__doc__, f"module docstring does not state {source.name}:{split} = {size:,}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_classes_labels_and_record_types(source):
    train = source.load("train")
    assert source.num_classes == train.num_classes == 26
    assert train.label_names == NOUN_LEXNAMES
    assert train.class_counts().min() > 0, "every class must occur in train"
    for split in source.splits:
        loaded = source.load(split)
        assert loaded.labels.dtype == np.int64
        assert 0 <= loaded.labels.min() and loaded.labels.max() < 26
        assert "WordNet 3.0" in loaded.about and "license" in loaded.about
    for i in (0, len(train) // 2, len(train) - 1):
        record = train[i]
        assert isinstance(record["text"], str) and record["text"] == record["text"].strip() != ""
        assert isinstance(record["label"], int | np.integer) and record["label"] == train.labels[i]


def test_both_sources_share_the_label_space():
    assert wordnet.LEXNAMES.load("test").label_names == wordnet.EXAMPLES.load("test").label_names


def test_each_synset_sits_in_the_one_split_its_offset_hashes_to():
    meta, columns = wordnet.read_asset()
    offsets = columns["offset"]
    assert len(offsets) == len(set(offsets)) == 82_115, "one row per noun synset, no offset twice"
    assert list(columns["split"]) == [make.split_of(offset) for offset in offsets]
    assert meta["split_rule"] == make.SPLIT_RULE and "WordNet 3.0" in meta["source"]


def test_loading_again_from_scratch_gives_identical_data():
    first = {(source.name, split): source.load(split) for source in SOURCES for split in source.splits}
    wordnet.read_asset.cache_clear()
    wordnet._columns.cache_clear()  # parse the asset again, not just hand back the cached columns
    for (name, split), before in first.items():
        after = wordnet.load(name, split)
        np.testing.assert_array_equal(after.labels, before.labels)
        assert after.records.columns["text"] == before.records.columns["text"]


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="train.*validation.*test"):
        wordnet.LEXNAMES.load("dev")


def test_gloss_split_into_definition_and_examples():
    gloss = 'a sudden outburst; "an explosion of laughter"; "the quality of mercy"--Shakespeare  '
    assert make.split_gloss(gloss) == ("a sudden outburst", ["an explosion of laughter", "the quality of mercy"])
    assert make.split_gloss('a workplace; as in the expression "on the job";') == (
        'a workplace; as in the expression "on the job"',
        [],
    )


@pytest.mark.skipif(not DATA_NOUN.exists(), reason=f"{DATA_NOUN} missing: install Debian's wordnet-base to rebuild")
def test_generator_rebuilds_the_shipped_asset_byte_for_byte(tmp_path):
    if not (DATA_NOUN.parent / "lexnames").exists() and not pathlib.Path(make.LEXNAMES_MAN_PAGE).exists():
        pytest.skip(f"no lexnames table: neither {DATA_NOUN.parent}/lexnames nor {make.LEXNAMES_MAN_PAGE}")
    if not pathlib.Path(make.COPYRIGHT_FILE).exists():
        pytest.skip(f"{make.COPYRIGHT_FILE} missing: the licence text comes from wordnet-base's copyright file")
    out = tmp_path / wordnet.ASSET
    make.main(["--out", str(out)])
    shipped = wordnet.asset_path()
    assert out.read_bytes() == shipped.read_bytes(), "rerun `python -m experiments.make_wordnet_data`"
    assert (tmp_path / "WORDNET_LICENSE").read_bytes() == (shipped.parent / "WORDNET_LICENSE").read_bytes()
