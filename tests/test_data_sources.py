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


# ------------------------------------------------------------------------------------------- file labels and format


def _load(tmp_path, name, content, **options):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return data.text_file(path, **options)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.csv", "text,label\na,pos\nb,\n", r"empty.csv, line 3: the label is empty"),
        ("blank.tsv", "text\tlabel\na\tpos\nb\t  \n", r"blank.tsv, line 3: the label is empty"),
        ("null.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": null}\n', r"null.jsonl, line 2: .*null"),
        ("list.jsonl", '{"text": "a", "label": ["pos"]}\n', r"list.jsonl, line 1: a label must be a string or a"),
        ("nan.jsonl", '{"text": "a", "label": NaN}\n', r"nan.jsonl, line 1: a label must be a string or a finite"),
        ("twice.csv", "text,label\na,1\nb,1.0\nc,pos\n", r"twice.csv, line 3: the label '1.0' is the number '1'"),
    ],
)
def test_unusable_labels_are_errors_naming_the_line(tmp_path, name, content, message):
    with pytest.raises(files.DataFileError, match=message):
        _load(tmp_path, name, content)


def test_label_spellings_of_one_class_are_one_class(tmp_path):
    """Whitespace around a label is not part of it; JSON has one number 1 = 1.0; true/false are spelled as in JSON."""
    spaced = _load(tmp_path, "spaced.csv", "text,label\na,0\nb,1\nc, 2\nd,pos \n", label_names=["0", "1", "2", "pos"])
    assert spaced.labels.tolist() == [0, 1, 2, 3]
    inferred = _load(tmp_path, "inferred.csv", "text,label\na,0\nb,1\nc, 2 \n")
    assert inferred.label_names == ("0", "1", "2") and inferred.labels.tolist() == [0, 1, 2]
    numbers = _load(tmp_path, "n.jsonl", "".join(json.dumps({"text": "t", "label": x}) + "\n" for x in (1, 1.0, 0)))
    assert numbers.label_names == ("0", "1") and numbers.labels.tolist() == [1, 1, 0]
    halves = _load(tmp_path, "h.jsonl", '{"text": "a", "label": 3.5}\n{"text": "b", "label": "4"}\n')
    assert halves.label_names == ("3.5", "4") and halves.labels.tolist() == [0, 1]
    flags = _load(tmp_path, "b.jsonl", '{"text": "a", "label": true}\n{"text": "b", "label": false}\n')
    assert flags.label_names == ("false", "true") and flags.labels.tolist() == [1, 0]


def test_integer_labels_with_empty_classes_are_errors(tmp_path):
    """1-based or code-like integer labels would add output classes that never see an example (4 outputs for
    labels 1..3, 501 for 404/500): an error saying how to read them, never a silent phantom class."""
    one_based = "text,label\na,1\nb,2\nc,3\nd,2\n"
    one_message = r"1 of the 4 classes 0..3 have no example \(0\)\. .*label_names=\['1', '2', '3'\]"
    with pytest.raises(files.DataFileError, match=one_message):
        _load(tmp_path, "one.csv", one_based)
    as_names = _load(tmp_path, "one.csv", one_based, label_names=["1", "2", "3"])
    assert as_names.label_names == ("1", "2", "3") and as_names.labels.tolist() == [0, 1, 2, 1]
    kept = _load(tmp_path, "one.csv", one_based, label_names=["0", "1", "2", "3"])
    assert kept.num_classes == 4 and kept.labels.tolist() == [1, 2, 3, 2]
    with pytest.raises(files.DataFileError, match=r"499 of the 501 classes 0..500 have no example \(0-403, 405-499\)"):
        _load(tmp_path, "codes.csv", "text,label\na,404\nb,500\n")
    with pytest.raises(files.DataFileError, match=r"999999999999 of the 1000000000001 classes .* \(1-999999999999\)"):
        _load(tmp_path, "huge.jsonl", '{"text": "a", "label": 1000000000000}\n{"text": "b", "label": 0}\n')
    with pytest.raises(ValueError, match=r"label_names has 'a' twice"):
        _load(tmp_path, "dup.csv", "text,label\nx,a\n", label_names=["a", "b", "a"])


def test_utf8_bom_and_encoding_errors(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; a file in another encoding is an error naming the line."""
    bom = _load(tmp_path, "bom.csv", "\ufefftext,label\nhello,pos\nbye,neg\n")
    assert bom.label_names == ("neg", "pos") and bom[0]["text"] == "hello"
    bom_jsonl = _load(tmp_path, "bom.jsonl", '\ufeff{"text": "hi", "label": "pos"}\n')
    assert bom_jsonl[0]["text"] == "hi"
    latin1 = "text,label\nok,pos\ncaf\u00e9,neg\n".encode("latin-1")
    with pytest.raises(files.DataFileError, match=r"latin1.csv, line 3: not UTF-8 .*byte 0xe9"):
        _load(tmp_path, "latin1.csv", latin1)


def test_tsv_is_read_without_quote_processing(tmp_path):
    """Raw TSV corpora (GLUE, SST) hold quotes as text: a tab ends a field and a newline a row, nothing else."""
    content = 'text\tlabel\n"A gripping film," said critics.\t1\n"quoted whole"\t0\nit\'s 5" tall\t1\n'
    tsv = _load(tmp_path, "quotes.tsv", content)
    assert [tsv[i]["text"] for i in range(3)] == ['"A gripping film," said critics.', '"quoted whole"', "it's 5\" tall"]
    assert tsv.labels.tolist() == [1, 0, 1]
    csv = _load(tmp_path, "quotes.csv", 'text,label\n"a, ""b""",0\n"multi\nline",1\n')
    assert [csv[i]["text"] for i in range(2)] == ['a, "b"', "multi\nline"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("quote.csv", 'text,label\nok,a\n"bad"x,b\n', r"quote.csv, line 3: '.' expected after '\"'"),
        ("open.csv", 'text,label\nok,a\n\n"never closed,b\nmore,a\n', r"open.csv, line 4: unexpected end of data"),
        ("after.csv", 'text,label\n"multi\nline",a\nshort\n', r"after.csv, line 4: expected 2 fields"),
        ("tab.tsv", "text\tlabel\nok\ta\nx\ty\tz\n", r"tab.tsv, line 3: expected 2 fields"),
    ],
)
def test_row_errors_name_the_line_the_row_starts_on(tmp_path, name, content, message):
    with pytest.raises(files.DataFileError, match=message):
        _load(tmp_path, name, content)
