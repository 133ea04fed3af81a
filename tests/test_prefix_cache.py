"""Frozen-prefix caching (`tljax.prefix_cache`): training the top from cached activations of the frozen bottom
blocks equals training the full model (dropout-free prefix; frozen BatchNorm in inference mode), phase by phase of
a schedule that thaws the cached blocks; the cache's batches are the pipeline's; bad setups are errors."""

import jax
import numpy as np
import pytest
from engine_driver import VOCAB, make_model

import tljax.models as tm
from tljax import engine, freezing, prefix_cache, rules, tree
from tljax.data import TrainData
from tljax.engine import EngineConfig
from tljax.partition import build
from tljax.prefix_cache import PrefixCache

BUCKETS = (8, 16)
# Two compilations of the same math (the cached one without the prefix): float32 rounding only, which AdamW at lr
# 1e-2 amplifies. Bitwise equal (0.0) on one host device; with 8 fake devices (the suite's XLA_FLAGS) XLA:CPU splits
# its work differently and the worst parameter differs by 1.7e-5 (jax.nn.dot_product_attention) / 2.7e-5 (attend).
ATOL = 5e-5


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """3 blocks, dropout off: the cached and the full model compute the same thing."""
    folder = tmp_path_factory.mktemp("bert_no_dropout")
    make_model(str(folder), num_layers=3)
    return str(folder)


@pytest.fixture(scope="module")
def bert(bert_dir):
    return tm.load_pretrained(bert_dir, num_classes=3, pooling="mean")


def text_split(n=40, seed=0):
    """Token records of ragged lengths 3..16, labels from the first token (learnable)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(2, VOCAB, rng.integers(3, 17)).astype(np.int32)
        out.append({"ids": ids, "label": int(ids[0] % 3)})
    return out


def pad_to_bucket(examples):
    """A text collate: pads to the smallest bucket holding the batch's longest example (as `TextBatcher` does)."""
    longest = max(len(e["ids"]) for e in examples)
    width = next(b for b in BUCKETS if b >= longest)
    ids = np.zeros((len(examples), width), np.int32)
    for i, e in enumerate(examples):
        ids[i, : len(e["ids"])] = e["ids"]
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32),
            "labels": np.asarray([e["label"] for e in examples], np.int32)}  # fmt: skip


def text_data(**kw):
    return TrainData(text_split(), batch_size=8, seed=3, collate=pad_to_bucket, threads=1, prefetch=2, **kw)


def top_k(k: int, steps: int):
    return freezing.FreezingSchedule((freezing.Phase(steps, rules="top_k", rule_args={"k": k}, learning_rate=1e-2),))


def fit(loaded, schedule, data, **kw):
    config = EngineConfig(devices=1, progress=False, log_every=1, optimizer={"weight_decay": 0.01}, **kw)
    return engine.fit(loaded, schedule, data, config)


def assert_same_run(a, b):
    pa, pb = tree.flatten(jax.device_get(a.state.params)), tree.flatten(jax.device_get(b.state.params))
    assert pa.keys() == pb.keys()
    worst = max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)
    assert worst < ATOL, worst
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra.metrics["loss"] == pytest.approx(rb.metrics["loss"], abs=1e-5)


def test_indices_are_the_rows_of_each_batch():
    split = text_split()
    for kw in ({}, {"lengths": np.asarray([len(r["ids"]) for r in split]), "window": 2}):
        data = text_data(**kw)
        for step, (batch, index) in enumerate(zip(data(5), data.indices(5), strict=False)):
            labels = np.asarray([split[i]["label"] for i in index])
            np.testing.assert_array_equal(batch["labels"], labels)
            np.testing.assert_array_equal(batch["input_ids"][:, :3], np.stack([split[i]["ids"][:3] for i in index]))
            if step == 12:  # past an epoch boundary (5 batches per epoch)
                break


def test_frozen_depth_follows_the_partition(bert):
    depth = lambda rule_list: prefix_cache.frozen_depth(
        bert, build(bert.params, rule_list, learning_rate=1e-3).trainable_mask
    )
    assert depth(rules.linear_probe(bert)) == 3
    assert depth(rules.top_k(bert, 1)) == 2
    assert depth(rules.top_k(bert, 3)) == 0  # stem frozen, block 0 trains
    assert depth(rules.surgical(bert, 1)) == 1
    assert depth(rules.full(bert)) == 0
    assert depth(rules.bitfit(bert)) == 0  # the embeddings' norm bias trains


def test_gradual_unfreezing_from_the_cache_equals_the_full_model(bert):
    """Gradual unfreezing's stages head (3 blocks cached), top_2 (1 cached), all (the full model: the phase thaws
    the cached blocks): same losses, same weights, optimizer state carried across the cached phases."""
    stage = lambda name, **args: freezing.Phase(steps=3, rules=name, rule_args=args, learning_rate=1e-2, name=name)
    schedule = freezing.FreezingSchedule((stage("linear_probe"), stage("top_k", k=2), stage("full")), "stages")
    plain = fit(bert, schedule, text_data())
    cached = fit(bert, schedule, text_data(), prefix_cache=PrefixCache())
    assert [h.prefix_blocks for h in cached.history] == [3, 1, 0]
    assert [h.prefix_blocks for h in plain.history] == [0, 0, 0]
    assert_same_run(cached, plain)
    # the cached phases trained something: the top block moved
    before, after = tree.flatten(bert.params), tree.flatten(jax.device_get(cached.state.params))
    assert (
        np.abs(
            after["backbone/encoder/layer_2/mlp/fc1/kernel"] - before["backbone/encoder/layer_2/mlp/fc1/kernel"]
        ).max()
        > 1e-3
    )  # noqa: E501


def test_min_blocks_and_disk_cache(bert, tmp_path, monkeypatch):
    schedule = top_k(2, 4)  # one cached block
    skipped = fit(bert, schedule, text_data(), prefix_cache=PrefixCache(min_blocks=2))
    assert skipped.history[0].prefix_blocks == 0
    disk = PrefixCache(directory=str(tmp_path), data_key="toy:train|pad=8,16")
    first = fit(bert, schedule, text_data(), prefix_cache=disk)
    assert first.history[0].prefix_blocks == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    # a second run reads the file (computing it again would fail), and trains the same
    monkeypatch.setattr(prefix_cache, "compute", lambda *a, **k: pytest.fail("recomputed a cached prefix"))
    again = fit(bert, schedule, text_data(), prefix_cache=disk)
    assert_same_run(again, first)
    assert_same_run(again, skipped)
    monkeypatch.undo()
    # another data key is another file
    fit(bert, schedule, text_data(), prefix_cache=PrefixCache(directory=str(tmp_path), data_key="other"))
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_disk_cache_refuses_rows_of_other_data(bert, tmp_path):
    """A file under a data_key holds the rows of the data that filled it: other data under the same key (a sweep's
    seed picking other rows; fewer or more rows) is an error naming the data_key and the directory, never a run
    trained on the wrong activations (or an IndexError)."""
    schedule = top_k(2, 2)
    disk = PrefixCache(directory=str(tmp_path), data_key="toy:train")
    data = lambda n, seed: TrainData(text_split(n, seed), batch_size=8, seed=3, collate=pad_to_bucket, threads=1)
    fit(bert, schedule, data(40, 0), prefix_cache=disk)
    for n, seed, message in ((40, 1, "other training data with the same number of rows"),
                             (24, 2, "40 rows, but the training data has 24"),
                             (56, 2, "40 rows, but the training data has 56")):  # fmt: skip
        with pytest.raises(ValueError, match=message) as e:
            fit(bert, schedule, data(n, seed), prefix_cache=disk)
        assert "'toy:train'" in str(e.value) and str(tmp_path) in str(e.value) and "seed" in str(e.value)
    # the same data (a TrainData of its own, another batch size: other bucket padding) reads the file
    same = TrainData(text_split(40, 0), batch_size=5, seed=3, collate=pad_to_bucket, threads=1)
    assert fit(bert, schedule, same, prefix_cache=disk).history[0].prefix_blocks == 1


def test_resnet_top_stage_from_the_cache(tmp_path_factory):
    """BatchNorm: the cached stages normalise with their running statistics, as the frozen ones of the plain run
    do; the trained stage's statistics update the same in both runs."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], layer_type="basic")
    folder = tmp_path_factory.mktemp("resnet")
    ResNetModel(cfg).eval().save_pretrained(folder)
    loaded = tm.load_pretrained(str(folder), num_classes=3)
    rng = np.random.default_rng(0)
    images = [{"pixel_values": rng.normal(size=(3, 32, 32)).astype(np.float32), "labels": np.int32(i % 3)}
              for i in range(24)]  # fmt: skip
    data = lambda: TrainData(images, batch_size=8, seed=1, threads=1)
    schedule = top_k(1, 5)
    plain = fit(loaded, schedule, data())
    cached = fit(loaded, schedule, data(), prefix_cache=PrefixCache())
    assert cached.history[0].prefix_blocks == 2
    assert_same_run(cached, plain)
    stats = lambda r: tree.flatten(jax.device_get(r.state.collections))
    for path, value in stats(plain).items():
        np.testing.assert_allclose(stats(cached)[path], value, atol=ATOL, err_msg=path)


def test_setups_the_cache_cannot_serve(bert):
    schedule = freezing.get("linear_probe", bert, steps=2, lr=1e-2)
    jitter = lambda record, rng: record
    with pytest.raises(ValueError, match="un-augmented"):
        fit(bert, schedule, text_data(random_transform=jitter), prefix_cache=PrefixCache())
    with pytest.raises(ValueError, match="TrainData"):
        fit(bert, schedule, lambda step: iter([]), prefix_cache=PrefixCache())
    with pytest.raises(ValueError, match="frozen_batchnorm"):
        EngineConfig(prefix_cache=PrefixCache(), frozen_batchnorm="train")
    with pytest.raises(ValueError, match="data_key"):
        PrefixCache(directory="/tmp/x")
    with pytest.raises(ValueError, match="min_blocks"):
        PrefixCache(min_blocks=0)
