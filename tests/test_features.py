"""Feature extraction: parity of every block and pooling with HF PyTorch `hidden_states`, masking, WithHead models,
one compile per batch shape, and the disk cache (hits skip the model; every key part changes the file)."""

import logging
import os

import jax
import numpy as np
import pytest
import torch
from conftest import max_abs_diff, token_batch

import tljax.models as tm
from tljax import features
from tljax.features import Features


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return tm.load_pretrained(tiny_bert_dir)


def _batches(length: int = 9, seed: int = 0) -> list[dict]:
    """Two batches of 4 rows; the last row of the second is padding (mask 0)."""
    out = []
    for b in range(2):
        ids, mask = token_batch(4, length, seed=seed + b)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": np.arange(4) + 4 * b})
    out[1]["mask"] = np.array([1, 1, 1, 0], np.float32)
    return out


def _hf_outputs(ref, batches) -> list:
    """HF PyTorch outputs with all hidden states, one forward per batch."""
    tensors = lambda b: dict(
        input_ids=torch.tensor(b["input_ids"]).long(), attention_mask=torch.tensor(b["attention_mask"])
    )
    with torch.no_grad():
        return [ref(**tensors(b), output_hidden_states=True) for b in batches]


def _hf_pooled(outputs, batches, hidden_index: int, pooling: str) -> np.ndarray:
    """HF's `hidden_states[hidden_index]` (or `pooler_output`) pooled as tljax does, padding rows dropped."""
    rows = []
    for out, batch in zip(outputs, batches, strict=True):
        h, mask = out.hidden_states[hidden_index].numpy(), batch["attention_mask"]
        pooled = {
            "cls": h[:, 0],
            "mean": (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True),
            "pooler": out.pooler_output.numpy(),
        }[pooling]
        rows.append(pooled[batch.get("mask", np.ones(len(mask))) > 0])
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def torch_bert(tiny_bert_dir):
    from transformers import BertModel

    return BertModel.from_pretrained(tiny_bert_dir).eval()


# (layer, pooling, index into HF's hidden_states): block i is hidden_states[i + 1], the final output the last.
SPECS = [(0, "mean", 1), (-2, "cls", 1), (-1, "mean", 2), (None, "pooler", -1), (None, "cls", -1)]


def test_matches_hf_hidden_states(bert, torch_bert):
    """Every (layer, pooling) from one pass; masked rows are dropped, labels kept in order."""
    batches = _batches()
    got = features.extract_many(bert, batches, [(layer, pooling) for layer, pooling, _ in SPECS])
    hf = _hf_outputs(torch_bert, batches)
    for feats, (layer, pooling, hidden_index) in zip(got, SPECS, strict=True):
        assert feats.x.shape == (7, 32) and feats.x.dtype == np.float32
        assert feats.labels.dtype == np.int64 and list(feats.labels) == [0, 1, 2, 3, 4, 5, 6]
        assert feats.layer == (None if layer is None else layer % 2) and feats.pooling == pooling
        assert max_abs_diff(feats.x, _hf_pooled(hf, batches, hidden_index, pooling)) <= 1e-4, (layer, pooling)


def test_compiles_once_per_batch_shape(bert, torch_bert):
    batches = _batches(length=9) + _batches(length=9, seed=5) + _batches(length=6)
    specs = [(layer, pooling) for layer, pooling, _ in SPECS]  # (4, 9) batches may reuse the test above's compile
    before = features.feature_step._cache_size()
    got = features.extract_many(bert, batches, specs)
    assert features.feature_step._cache_size() - before <= 2  # six batches, two shapes: (4, 9) and (4, 6)
    assert len(got[2]) == 3 * 7
    assert max_abs_diff(got[2].x, _hf_pooled(_hf_outputs(torch_bert, batches), batches, 2, "mean")) <= 1e-4
    again = features.feature_step._cache_size()
    features.extract_many(bert, batches, specs)
    assert features.feature_step._cache_size() == again  # a second pass compiles nothing


def test_extract_is_one_spec_of_extract_many(bert, torch_bert):
    batches = _batches()
    feats = features.extract(bert, batches, layer=-1, pooling="mean")  # the cache tests below reuse this compile
    assert (feats.layer, feats.pooling, len(feats)) == (1, "mean", 7)
    assert max_abs_diff(feats.x, _hf_pooled(_hf_outputs(torch_bert, batches), batches, 2, "mean")) <= 1e-4


def test_with_head_model_extracts_its_backbone(bert, tiny_bert_dir):
    headed = tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="mean")
    batches = _batches()
    got = features.extract(headed, batches, layer=1, pooling="mean")  # compiled already: equal modules hash equal
    want = features.extract(bert, batches, layer=1, pooling="mean")
    np.testing.assert_array_equal(got.x, want.x)


def test_integer_label_columns_are_refused_soft_labels_are_argmaxed(bert):
    """Regression: any 2-D labels were argmaxed, so (B, 1) labels became all 0 and multi-task (B, tasks) labels
    the index of the task column."""
    batch = _batches()[0]
    labels = np.arange(len(batch["input_ids"])) % 3
    with pytest.raises(ValueError, match=r"got shape \(\d+, 1\) and dtype int64"):
        features.extract(bert, [{**batch, "labels": labels[:, None]}])
    soft = np.eye(3, dtype=np.float32)[labels]
    np.testing.assert_array_equal(features.extract(bert, [{**batch, "labels": soft}]).labels, labels)


@pytest.mark.parametrize("layer", [2, -3, True, 1.0])
def test_layer_out_of_range(bert, layer):
    with pytest.raises(ValueError, match="out of range.*2 blocks"):
        features.extract(bert, _batches(), layer=layer)


def test_pooling_that_does_not_apply(bert):
    with pytest.raises(ValueError, match="does not apply to block 0"):
        features.extract(bert, _batches(), layer=0, pooling="pooler")
    with pytest.raises(ValueError, match="does not apply to token sequences"):
        features.extract(bert, _batches()[:1], layer=0, pooling="spatial_mean")
    with pytest.raises(ValueError, match="needs output 'image_embeds'"):
        features.extract(bert, _batches()[:1], pooling="image_embeds")


def test_resnet_stage_features(tmp_path):
    """ResNet blocks are stages; a stage's feature map pools by its spatial mean, equal to HF's hidden_states."""
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ref = ResNetModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    loaded = tm.load_pretrained(tmp_path)
    images = np.random.RandomState(0).randn(3, 3, 32, 32).astype(np.float32)
    feats = features.extract(loaded, [{"pixel_values": images}], layer=0, pooling="mean")
    with torch.no_grad():
        want = ref(pixel_values=torch.tensor(images), output_hidden_states=True).hidden_states[1].mean((2, 3))
    assert max_abs_diff(feats.x, want) <= 1e-4
    assert list(feats.labels) == [-1, -1, -1]  # no labels in the batches
    with pytest.raises(ValueError, match="does not apply to feature maps"):
        features.extract(loaded, [{"pixel_values": images}], layer=1, pooling="cls")


# --- the disk cache ---


def _raise():
    raise AssertionError("batches_fn called on a cache hit")


def test_cache_hit_loads_without_running(bert, tmp_path):
    kw = dict(cache_dir=tmp_path, data_key="toy:train|len=9", layer=-1, pooling="mean")
    first = features.cached_extract(bert, _batches, **kw)
    second = features.cached_extract(bert, _raise, **kw)
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert (second.layer, second.pooling) == (1, "mean")
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # the temp file was renamed, nothing left behind
    # The same block named from the bottom is the same entry.
    features.cached_extract(bert, _raise, **{**kw, "layer": 1})


def test_a_damaged_cache_file_is_computed_again(bert, tmp_path, caplog):
    """Regression: a truncated .npz (a partial copy; tljax's own writes are atomic) raised a bare EOFError naming no
    file; it is now named in a warning and computed again."""
    kw = dict(cache_dir=tmp_path, data_key="toy:train|len=9", layer=-1, pooling="mean")
    first = features.cached_extract(bert, _batches, **kw)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:100])
    logger = logging.getLogger("tljax")
    logger.addHandler(caplog.handler)  # whether or not an entry point stopped tljax's records propagating
    try:
        again = features.cached_extract(bert, _batches, **kw)
    finally:
        logger.removeHandler(caplog.handler)
    assert f"feature cache file {path} is damaged" in caplog.text
    np.testing.assert_array_equal(again.x, first.x)
    np.testing.assert_array_equal(features.cached_extract(bert, _raise, **kw).x, first.x)  # rewritten: a hit


def test_cache_key_parts_each_change_the_file(bert, tmp_path, monkeypatch):
    calls = []

    def fake_extract(loaded, batches, **kw):
        calls.append(kw)
        return Features(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), kw["layer"], kw["pooling"])

    monkeypatch.setattr(features, "extract", fake_extract)
    base = dict(cache_dir=tmp_path, data_key="toy:train|len=9", layer=0, pooling="cls")
    perturbed = jax.tree.map(lambda x: x, bert.params)
    perturbed["encoder"]["layer_1"]["mlp"]["fc2"]["bias"] = perturbed["encoder"]["layer_1"]["mlp"]["fc2"]["bias"] + 1e-3
    variants = [{}, {"layer": 1}, {"pooling": "mean"}, {"data_key": "toy:train|len=16"}, {"params": perturbed}]
    for v in variants:
        features.cached_extract(bert, lambda: [], **{**base, **v})
    assert len(calls) == len(variants) and len(os.listdir(tmp_path)) == len(variants)
    for v in variants:  # every one of them is now a hit
        features.cached_extract(bert, _raise, **{**base, **v})
    assert len(calls) == len(variants)


def test_cache_write_is_atomic(bert, tmp_path, monkeypatch):
    """A write that fails halfway leaves no file a later run would trust, and no temp file."""
    feats = Features(np.zeros((2, 3), np.float32), np.zeros(2, np.int64))

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        features.save_features(tmp_path / "x.npz", feats, {})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="data_key"):
        features.cached_extract(bert, _raise, cache_dir=tmp_path, data_key="")


def test_checkpoint_id_is_stable_and_value_sensitive(bert, tiny_bert_dir):
    module, variables = features.backbone_of(bert)
    again = tm.load_pretrained(tiny_bert_dir, num_classes=2)  # same backbone weights, with a head around it
    assert features.checkpoint_id(module, variables) == features.checkpoint_id(*features.backbone_of(again))
    flat = jax.tree.map(np.array, variables)
    flat["params"]["embeddings"]["norm"]["scale"][3] += 1e-6
    assert features.fingerprint(flat) != features.fingerprint(variables)
    half = tm.load_pretrained(tiny_bert_dir, dtype="bfloat16")
    assert features.checkpoint_id(*features.backbone_of(half)) != features.checkpoint_id(module, variables)
