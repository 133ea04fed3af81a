"""Grain pipelines: index-based resumable streams, per-process shards, padded evaluation, text buckets."""

import numpy as np
import pytest

from tljax import data
from tljax.data.records import ArrayRecords, Split


def numbered(n: int = 23, classes: int = 3) -> Split:
    """Records that carry their own index, so batches show which examples they hold."""
    labels = np.arange(n) % classes
    return Split("toy:train", ArrayRecords({"x": np.arange(n), "label": labels}), labels, ("a", "b", "c"), "image")


def jitter(record, rng):
    return {"x": record["x"], "noise": rng.random(), "labels": record["label"]}


def batches(train, start, count):
    it = train(start)
    return [next(it) for _ in range(count)]


def test_resuming_at_any_step_equals_the_uninterrupted_stream():
    train = data.TrainData(numbered(), batch_size=4, seed=7, random_transform=jitter)
    full = batches(train, 0, 15)  # crosses two epoch boundaries (23 examples, 5 per epoch + a partial one)
    for start in (1, 5, 6, 11):
        tail = batches(train, start, 15 - start)
        for a, b in zip(full[start:], tail, strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(train.batch(9)[k], full[9][k]) for k in full[9])


def test_epochs_are_seeded_permutations():
    split = numbered(20)
    train = data.TrainData(split, batch_size=4, seed=1)
    xs = np.concatenate([b["x"] for b in batches(train, 0, 10)])
    first, second = xs[:20], xs[20:]
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert not np.array_equal(first, second)  # a new permutation per epoch
    again = np.concatenate([b["x"] for b in batches(data.TrainData(split, batch_size=4, seed=1), 0, 10)])
    other = np.concatenate([b["x"] for b in batches(data.TrainData(split, batch_size=4, seed=2), 0, 10)])
    assert np.array_equal(xs, again) and not np.array_equal(xs, other)
    assert train.steps_per_epoch == 5


def test_process_shards_are_disjoint_cover_the_global_batch_and_keep_augmentation():
    split = numbered(24)
    one = data.TrainData(split, batch_size=8, seed=4, random_transform=jitter, process_index=0, process_count=1)
    parts = [
        data.TrainData(split, batch_size=8, seed=4, random_transform=jitter, process_index=p, process_count=4)
        for p in range(4)
    ]
    for step in (0, 3, 7):
        whole = one.batch(step)
        local = [p.batch(step) for p in parts]
        xs = np.concatenate([b["x"] for b in local])
        assert len(set(xs)) == 8 and set(xs) == set(whole["x"])  # disjoint and covering
        noise = {int(x): n for b in local for x, n in zip(b["x"], b["noise"], strict=True)}
        assert all(noise[int(x)] == n for x, n in zip(whole["x"], whole["noise"], strict=True))  # same draws
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.TrainData(split, batch_size=8, process_index=0, process_count=3)


def test_batch_transform_is_seeded_by_step():
    def shift(batch, rng):
        return batch | {"label": batch["label"] + rng.integers(100)}

    train = data.TrainData(numbered(), batch_size=4, seed=0, batch_transform=shift)
    again = data.TrainData(numbered(), batch_size=4, batch_transform=shift)
    assert np.array_equal(train.batch(3)["label"], batches(train, 3, 1)[0]["label"])
    assert np.array_equal(train.batch(3)["label"], again.batch(3)["label"])
    assert train.batch(3)["label"].min() >= 0 and not np.array_equal(train.batch(3)["label"], train.batch(4)["label"])


def test_eval_data_pads_with_a_mask_and_covers_every_example_once():
    split = numbered(10)
    shards = [data.EvalData(split, batch_size=4, process_index=p, process_count=2) for p in range(2)]
    seen = []
    for shard in shards:
        assert len(shard) == 3
        for b in shard():
            assert b["x"].shape == (2,) and b["mask"].dtype == np.float32
            seen += [int(x) for x, m in zip(b["x"], b["mask"], strict=True) if m]
    assert sorted(seen) == list(range(10))
    total_padding = sum(float((1 - b["mask"]).sum()) for s in shards for b in s())
    assert total_padding == 2  # 12 rows for 10 examples


def test_errors_for_bad_pipelines():
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.TrainData(numbered(3), batch_size=4)
    with pytest.raises(data.EmptySplitError, match="has no examples"):
        data.TrainData(numbered(10).take([], "none"), batch_size=4)
    with pytest.raises(ValueError, match="not both"):
        data.TrainData(numbered(), batch_size=4, transform=dict, random_transform=jitter)
    with pytest.raises(ValueError, match="step >= 0"):
        data.TrainData(numbered(), batch_size=4)(-1)


class CharTokenizer:
    """A stand-in fast tokenizer: one id per character between [CLS]=1 and [SEP]=2, pad 0; truncation keeps [SEP]
    as HF's does."""

    pad_token_id, all_special_ids = 0, [1, 2]

    def __call__(self, texts, truncation=False, max_length=None):
        ids = [[1] + [3 + (ord(c) % 50) for c in t] + [2] for t in texts]
        if truncation:
            ids = [x if len(x) <= max_length else x[: max_length - 1] + [2] for x in ids]
        return {"input_ids": ids}


def test_text_batches_pad_to_buckets_and_truncate():
    batcher = data.TextBatcher(CharTokenizer(), max_length=32)
    assert batcher.buckets == (8, 16, 32)
    short = batcher([{"text": "ab", "label": 1}, {"text": "abcdef", "label": 0}])
    assert short["input_ids"].shape == (2, 8) and short["attention_mask"].sum(1).tolist() == [4, 8]
    assert short["labels"].tolist() == [1, 0] and short["input_ids"].dtype == np.int32
    long = batcher([{"text": "x" * 100, "label": 2}])
    assert long["input_ids"].shape == (1, 32) and long["input_ids"][0, -1] == 2  # [SEP] kept at the cut
    assert batcher.truncated == 1
    with pytest.raises(ValueError, match="end at max_length"):
        data.TextBatcher(CharTokenizer(), max_length=32, buckets=(8, 16))


def test_real_tokenizer_matches_hf_truncation_and_shapes_stay_bounded():
    from tljax.assets import minilm_path
    from tljax.models import load_tokenizer

    tok = load_tokenizer(minilm_path())
    batcher = data.TextBatcher(tok, max_length=24)
    split = data.load("wordnet_lexnames:validation")
    train = data.TrainData(split, batch_size=16, collate=batcher)
    widths = {b["input_ids"].shape[1] for b in batches(train, 0, 40)}
    assert widths <= set(batcher.buckets)
    records = [split[i] for i in range(8)]
    ours = batcher(records)
    want = tok([r["text"] for r in records], truncation=True, max_length=24, padding="longest")["input_ids"]
    for row, ref in zip(ours["input_ids"], want, strict=True):
        assert row[: len(ref)].tolist() == ref


def test_length_grouped_batches_cover_each_epoch_resume_and_pad_less():
    split = numbered(96)
    lengths = np.random.default_rng(0).integers(1, 60, 96)
    grouped = data.TrainData(split, batch_size=8, seed=5, lengths=lengths, window=4)
    plain = data.TrainData(split, batch_size=8, seed=5)
    epoch = np.concatenate([grouped.batch(s)["x"] for s in range(12)])
    assert sorted(epoch) == list(range(96))  # each epoch: every example once
    assert not np.array_equal(epoch, np.concatenate([grouped.batch(s)["x"] for s in range(12, 24)]))
    spread = lambda td: np.mean([np.ptp(lengths[td.batch(s)["x"]]) for s in range(12)])
    assert spread(grouped) < 0.5 * spread(plain)  # batches of similar lengths
    tail = batches(grouped, 7, 10)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(batches(grouped, 0, 17)[7:], tail, strict=True))
    with pytest.raises(ValueError, match="lengths has 3 entries for 96 examples"):
        data.TrainData(split, batch_size=8, lengths=[1, 2, 3])
