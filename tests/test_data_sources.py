"""Sources by name (registered, TFDS, files, folders), transfer splits and their errors."""

import json

import numpy as np
import pytest
from PIL import Image

from tljax import data
from tljax.data import files, splits


def test_registered_sources_load_by_name_with_documented_sizes():
    rows = {r["name"]: r for r in data.list_sources()}
    assert set(rows) == {"fashion_mnist", "digits", "wordnet_lexnames", "wordnet_examples"}
    for name in ("digits", "wordnet_lexnames"):
        for split, size in rows[name]["splits"].items():
            loaded = data.load(f"{name}:{split}")
            assert len(loaded) == size and loaded.num_classes == rows[name]["classes"]
    assert data.load("digits", "test").name == "digits:test"
    assert "wordnet_examples" in data.format_sources()


def test_source_errors_are_clear(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'cifar' .*registered: .*'digits'"):
        data.load("cifar:train")
    with pytest.raises(ValueError, match="needs a split: write 'digits:<split>' with one of"):
        data.load("digits")
    with pytest.raises(ValueError, match="unknown split 'valid' of 'digits'; valid splits: \\['train', 'test'\\]"):
        data.load("digits:valid")
    with pytest.raises(ValueError, match="names split 'train' but split='test'"):
        data.load("digits:train", split="test")
    monkeypatch.setenv("TLJAX_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(data.SourceUnavailable, match="dataset-fashion-mnist"):
        data.load("fashion_mnist:train")


def test_text_files_csv_tsv_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",pos\nbad day,neg\nfine,pos\n')
    (tmp_path / "a.tsv").write_text("sentence\ty\nhello\t1\nbye\t0\n")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "x", "label": "neg"}) + "\n\n" + '{"text": "y", "label": "pos"}\n'
    )
    csv = data.load(f"file:{tmp_path / 'a.csv'}")
    assert csv.label_names == ("neg", "pos") and csv.labels.tolist() == [1, 0, 1] and csv[0]["text"] == "hello, world"
    tsv = data.text_file(tmp_path / "a.tsv", text_column="sentence", label_column="y")
    assert tsv.label_names == ("0", "1") and tsv.labels.tolist() == [1, 0]
    jsonl = data.text_file(tmp_path / "a.jsonl", label_names=csv.label_names)
    assert jsonl.labels.tolist() == [0, 1] and len(jsonl) == 2


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("short.csv", "text,label\nok,a\nmissing field\n", r"short.csv, line 3: expected 2 fields"),
        ("long.csv", "text,label\nok,a\nx,a,extra\n", r"long.csv, line 3: expected 2 fields"),
        ("cols.csv", "sentence,label\nok,a\n", r"cols.csv, line 1: the header .* has no column 'text'"),
        ("empty.csv", "text,label\nok,a\n ,b\n", r"empty.csv, line 3: the text is empty"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 2}\n', r"bad.jsonl, line 2: not valid JSON"),
        ("key.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 2}\n', r"key.jsonl, line 2: no 'text' field"),
        ("none.csv", "text,label\n", r"none.csv: no rows"),
    ],
)
def test_malformed_rows_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(files.DataFileError, match=message):
        data.text_file(tmp_path / name)


def test_unknown_label_names_the_line(tmp_path):
    (tmp_path / "test.csv").write_text("text,label\nok,pos\nhm,maybe\n")
    with pytest.raises(files.DataFileError, match=r"test.csv, line 3: unknown label 'maybe'; the label space is"):
        data.text_file(tmp_path / "test.csv", label_names=("neg", "pos"))
    with pytest.raises(FileNotFoundError):
        data.text_file(tmp_path / "nope.csv")


def test_image_folder_by_name(tmp_path):
    for split in ("train", "test"):
        for c, color in (("cat", 10), ("dog", 200)):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (5, 4), (color, 0, 0)).save(tmp_path / split / c / "1.png")
    test = data.load(f"folder:{tmp_path}:test")
    assert test.label_names == ("cat", "dog") and test[1]["image"].shape == (4, 5, 3)
    with pytest.raises(ValueError, match="needs a split"):
        data.load(f"folder:{tmp_path}")


def test_tfds_sources_through_mock_data():
    """The `tfds:` path end to end without a network: TFDS's mock data behind `tfds.data_source`."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        mnist = data.load("tfds:mnist:train")
        reviews = data.load("tfds:imdb_reviews:test")
    assert mnist.kind == "image" and mnist.name == "tfds:mnist:train" and len(mnist) == 12
    assert mnist.num_classes == 10 and mnist[3]["image"].shape == (28, 28, 1) and mnist[3]["image"].dtype == np.uint8
    assert mnist.labels.tolist() == [mnist[i]["label"] for i in range(12)]
    assert reviews.kind == "text" and isinstance(reviews[0]["text"], str) and reviews.label_names == ("neg", "pos")


def test_tfds_missing_dataset_says_how_to_prepare_it(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.SourceUnavailable, match=r"tfds build mnist --file_format=array_record"):
        data.load("tfds:mnist:train", data_dir=str(tmp_path))


def test_k_shot_is_seeded_and_balanced():
    train = data.load("digits:train")
    a, b, c = data.k_shot(train, 5, seed=1), data.k_shot(train, 5, seed=1), data.k_shot(train, 5, seed=2)
    assert a.class_counts().tolist() == [5] * 10 and a.name == "digits:train[5shot@1]"
    assert np.array_equal(a.records.indices, b.records.indices)
    assert not np.array_equal(a.records.indices, c.records.indices)
    with pytest.raises(ValueError, match=r"k=200 is larger than class 0 \('0'\) of 'digits:train', which has 143"):
        data.k_shot(train, 200)


def test_carve_validation_is_disjoint_stratified_and_seeded():
    full = data.load("digits:train")
    train, val = data.carve_validation(full, 0.2, seed=0)
    ti, vi = set(train.records.indices), set(val.records.indices)
    assert not ti & vi and len(ti | vi) == len(full) and len(val) == round(0.2 * len(full))
    assert np.abs(val.class_counts() / len(val) - full.class_counts() / len(full)).max() < 0.01
    assert np.array_equal(data.carve_validation(full, 0.2, seed=0)[1].records.indices, val.records.indices)
    with pytest.raises(ValueError, match="leaves no train"):
        data.carve_validation(full, 1.0)


def test_label_halves_and_subsets():
    a, b = data.label_halves(10, seed=0)
    assert len(a) == len(b) == 5 and not set(a) & set(b) and set(a) | set(b) == set(range(10))
    train = data.load("digits:train")
    sub = data.label_subset(train, a)
    assert sub.num_classes == 5 and sub.label_names == tuple(str(c) for c in a)
    assert sorted(set(sub.labels)) == [0, 1, 2, 3, 4]
    assert all(sub[i]["label"] == sub.labels[i] for i in range(0, len(sub), 37))
    assert data.label_subset(train, ["3", "1"]).label_names == ("3", "1")
    with pytest.raises(ValueError, match="unknown class 'x'"):
        data.label_subset(train, ["x"])


def test_subsample_keeps_proportions():
    train = data.load("wordnet_lexnames:train")
    sub = data.subsample(train, 2600, seed=0)
    assert len(sub) == 2600
    want = train.class_counts() * 2600 / len(train)
    assert np.abs(sub.class_counts() - want).max() <= 1


def test_empty_split_is_an_error():
    empty = data.load("digits:test").take([], "none")
    with pytest.raises(splits.EmptySplitError, match=r"digits:test\[none\]' has no examples"):
        data.EvalData(empty, batch_size=4)


def test_domain_pairs_share_the_label_space():
    source, target = data.domain_pair("wordnet", "test")
    assert source.label_names == target.label_names and source.kind == target.kind == "text"
    clean, shifted = data.domain_pair("fashion_mnist_c", "train", corruption="zigzag", severity=2)
    assert len(clean) == len(shifted) == 30_000 and clean.label_names == shifted.label_names
    assert not set(clean.records.indices) & set(shifted.records.records.indices)  # disjoint halves
    test_clean, test_shifted = data.domain_pair("fashion_mnist_c", "test")
    assert np.array_equal(test_clean.labels, test_shifted.labels)
    assert not np.array_equal(test_clean[0]["image"], test_shifted[0]["image"])
    with pytest.raises(ValueError, match="unknown domain-shift pair"):
        data.domain_pair("mnist_m", "train")
