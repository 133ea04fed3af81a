"""Stochastic depth (`drop_path_rate`) and dropout overrides as family build options."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import token_batch

import tljax.models as tm
from tljax.models import bert, clip, layers, resnet, vit
from tljax.models.scratch import hf_config_of

TINY = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=20)
RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [2, 2],
          "layer_type": "basic"}  # fmt: skip


def _clip_config():
    from transformers import CLIPConfig

    text = dict(TINY, vocab_size=50, max_position_embeddings=10, attention_dropout=0.1)
    vision = dict(TINY, num_hidden_layers=2, image_size=16, patch_size=8, attention_dropout=0.2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)


def _block_rates(model, inputs, block_type) -> dict[str, float]:
    """{module path: drop_path} of every `block_type` the model calls (read while tracing its init)."""
    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, block_type) and context.method_name == "__call__":
            rates["/".join(context.module.path)] = context.module.drop_path
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
    return rates


def test_identity_in_inference_and_at_rate_zero():
    x = jax.random.normal(jax.random.key(0), (8, 5, 4))
    rngs = {"dropout": jax.random.key(1)}
    assert layers.DropPath(0.5).apply({}, x, deterministic=True, rngs=rngs) is x
    assert layers.DropPath(0.0).apply({}, x, deterministic=False) is x  # draws no randomness: no rngs needed
    train = layers.DropPath(0.5).apply({}, x, deterministic=False, rngs=rngs)
    assert not np.array_equal(train, x)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_drops_rows_at_the_rate_and_scales_kept_rows_exactly(rate):
    rows = 20_000
    x = jax.random.uniform(jax.random.key(0), (rows, 3, 2), minval=1.0, maxval=2.0)  # no zeros
    out = np.asarray(layers.drop_path(x, rate, jax.random.key(1)))
    dropped = np.all(out == 0, axis=(1, 2))
    assert abs(dropped.mean() - rate) < 0.015  # binomial std at 20k rows is <= 0.0035
    kept = ~dropped
    np.testing.assert_array_equal(out[kept], np.asarray(x)[kept] * np.float32(1.0 / (1.0 - rate)))
    assert np.all(out[dropped] == 0)  # whole rows go, never single elements


def test_module_uses_the_dropout_stream():
    x = jnp.ones((64, 4))
    draw = lambda seed: layers.DropPath(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(draw(0), draw(0))
    assert not np.array_equal(draw(0), draw(1))
    with pytest.raises(Exception, match="dropout"):
        layers.DropPath(0.5).apply({}, x, deterministic=False)


def test_linear_schedule():
    rates = layers.linear_rates(0.1, 4)
    assert rates[0] == 0.0 and rates[-1] == 0.1
    np.testing.assert_allclose(rates, [0.0, 0.1 / 3, 0.2 / 3, 0.1])
    assert layers.linear_rates(0.1, 1) == (0.0,)
    assert layers.linear_rates(0.0, 3) == (0.0, 0.0, 0.0)


def test_encoder_layers_get_the_linear_schedule():
    from transformers import BertConfig, ViTConfig

    cfg = BertConfig(vocab_size=50, **TINY)
    rates = _block_rates(bert.build(cfg, drop_path_rate=0.2), bert.dummy_inputs(cfg), layers.Block)
    assert rates == {"encoder/layer_0": 0.0, "encoder/layer_1": 0.1, "encoder/layer_2": 0.2}
    cfg = ViTConfig(**TINY, image_size=16, patch_size=8)
    assert list(_block_rates(vit.build(cfg, drop_path_rate=0.3), vit.dummy_inputs(cfg), layers.Block).values()) == [
        0.0, 0.15, 0.3]  # fmt: skip


def test_clip_applies_the_rate_to_both_towers():
    cfg = _clip_config()
    rates = _block_rates(clip.build(cfg, drop_path_rate=0.2), clip.dummy_inputs(cfg), layers.Block)
    assert rates == {
        "vision/encoder/layer_0": 0.0, "vision/encoder/layer_1": 0.2,
        "text/encoder/layer_0": 0.0, "text/encoder/layer_1": 0.1, "text/encoder/layer_2": 0.2,
    }  # fmt: skip


def test_resnet_blocks_get_the_linear_schedule_over_all_stages():
    cfg = hf_config_of(RESNET)
    rates = _block_rates(resnet.build(cfg, drop_path_rate=0.3), resnet.dummy_inputs(cfg), resnet.Block)
    assert rates == pytest.approx(
        {"stage_0/block_0": 0.0, "stage_0/block_1": 0.1, "stage_1/block_0": 0.2, "stage_1/block_1": 0.3}
    )
    assert rates["stage_1/block_1"] == 0.3


def test_dropout_overrides_and_bad_values():
    from transformers import BertConfig, ViTConfig

    cfg = BertConfig(vocab_size=50, **TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.05)
    kept = bert.build(cfg)
    assert (kept.dropout, kept.attention_dropout, kept.drop_path_rate) == (0.1, 0.05, 0.0)
    model = bert.build(cfg, dropout=0.3, attention_dropout=0.0)
    assert (model.dropout, model.attention_dropout) == (0.3, 0.0)
    assert cfg.hidden_dropout_prob == 0.1  # the config is not rewritten
    vcfg = ViTConfig(**TINY, image_size=16, patch_size=8)
    assert vit.build(vcfg, dropout=0.2).dropout == 0.2
    for bad in (1.0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
            bert.build(cfg, dropout=bad)
    with pytest.raises(ValueError, match=r"attention_dropout must be a probability in \[0, 1\), got 2"):
        vit.build(vcfg, attention_dropout=2)
    with pytest.raises(ValueError, match=r"drop_path_rate must be a probability in \[0, 1\), got 1.0"):
        vit.build(vcfg, drop_path_rate=1.0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        resnet.build(hf_config_of(RESNET), drop_path_rate=-0.5)


def test_clip_dropout_overrides_both_towers():
    cfg = _clip_config()
    default = clip.build(cfg)
    assert (default.vision.attention_dropout, default.text.attention_dropout) == (0.2, 0.1)
    assert default.vision.dropout == default.text.dropout == 0.0  # transformers' CLIP has no hidden dropout
    model = clip.build(cfg, dropout=0.1, attention_dropout=0.3)
    for tower in (model.vision, model.text):
        assert (tower.dropout, tower.attention_dropout) == (0.1, 0.3)


@pytest.fixture(scope="module")
def bert_pair(tiny_bert_dir):
    """The tiny checkpoint as loaded, and with drop path (dropout off, so train mode differs by drop path alone)."""
    plain = tm.load_pretrained(tiny_bert_dir, num_classes=3, dropout=0.0, attention_dropout=0.0)
    dropping = tm.load_pretrained(tiny_bert_dir, num_classes=3, drop_path_rate=0.5, dropout=0.0, attention_dropout=0.0)
    return plain, dropping


def _features(loaded, seed=None):
    """Pooled features (the new head's logits start at zero, whatever the backbone gives)."""
    ids, mask = token_batch(8, 6)
    kw = {} if seed is None else dict(train=True, rngs={"dropout": jax.random.key(seed)})
    return np.asarray(loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask, **kw)["features"])


def test_load_pretrained_with_drop_path(bert_pair):
    plain, dropping = bert_pair
    assert dropping.model.backbone.drop_path_rate == 0.5
    jax.tree.map(np.testing.assert_array_equal, plain.params, dropping.params)
    np.testing.assert_array_equal(_features(dropping), _features(plain))  # inference: bitwise the rate-0 model
    np.testing.assert_array_equal(_features(plain, seed=0), _features(plain))  # rate 0, no dropout: train == inference
    train = _features(dropping, seed=0)
    assert not np.allclose(train, _features(dropping))
    np.testing.assert_array_equal(train, _features(dropping, seed=0))  # same RNG, same masks
    assert not np.allclose(train, _features(dropping, seed=1))


def test_from_config_forwards_family_options():
    cfg = {"model_type": "bert", "vocab_size": 50, **TINY}
    backbone = tm.from_config(cfg, num_classes=3, drop_path_rate=0.2, attention_dropout=0.0).model.backbone
    assert (backbone.drop_path_rate, backbone.dropout, backbone.attention_dropout) == (0.2, 0.1, 0.0)


def test_resnet_drops_paths_in_training_only():
    cfg = hf_config_of(RESNET)
    plain, dropping = resnet.build(cfg), resnet.build(cfg, drop_path_rate=0.5)
    shapes = jax.eval_shape(lambda: dropping.init(jax.random.key(0), **resnet.dummy_inputs(cfg)))
    rng = np.random.RandomState(0)  # random values without compiling an init (slow for convs on CPU)
    variables = {
        "params": jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes["params"]),
        "batch_stats": jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes["batch_stats"]),
    }
    x = rng.randn(4, 3, 32, 32).astype(np.float32)

    @jax.jit
    def outputs(variables, x):
        train = lambda seed: dropping.apply(
            variables, pixel_values=x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)}
        )[0]["pooler_output"]
        infer = lambda model: model.apply(variables, pixel_values=x)["pooler_output"]
        return train(0), train(1), infer(dropping), infer(plain)

    train0, train1, infer, infer_plain = outputs(variables, x)
    np.testing.assert_array_equal(infer, infer_plain)
    assert not np.allclose(train0, train1)


def test_job_config_options_reach_the_model(tiny_bert_dir):
    import ml_collections

    from tljax.job.build import load_model

    cfg = ml_collections.ConfigDict({"name": tiny_bert_dir, "options": {"drop_path_rate": 0.1, "dropout": 0.0}})
    model = load_model(cfg, num_classes=3).model.backbone
    assert (model.drop_path_rate, model.dropout) == (0.1, 0.0)
