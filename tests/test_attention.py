"""The `attention` family option: "fused" (`jax.nn.dot_product_attention`, cuDNN's kernel on a GPU) gives eager
attention's outputs and gradients on the same parameters; the operands it hands cuDNN pass JAX's checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import token_batch

import tljax.models as tm
from tljax import partition, rules, task
from tljax.models import layers
from tljax.step import init_state, make_train_step

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20)
CONFIGS = {  # odd lengths on purpose: ViT 5 patches + CLS, CLIP's causal text of 7 tokens
    "bert": {"model_type": "bert", "vocab_size": 50, **TINY},
    "vit": {"model_type": "vit", "image_size": 8, "patch_size": 4, "num_channels": 3, **TINY},
    "clip": {"model_type": "clip", "projection_dim": 8, "text_config": {"vocab_size": 50, **TINY,
             "max_position_embeddings": 16}, "vision_config": {"image_size": 8, "patch_size": 4, **TINY}},
}  # fmt: skip


def _inputs(family: str) -> dict:
    ids, mask = token_batch(4, 7, vocab=50)
    pixels = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    return {"bert": {"input_ids": ids, "attention_mask": mask}, "vit": {"pixel_values": pixels},
            "clip": {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}}[family]  # fmt: skip


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fused_attention_gives_eager_outputs_and_training_step(family, monkeypatch):
    build = lambda attention: tm.from_config(CONFIGS[family], num_classes=3, seed=0, attention=attention,
                                             attention_dropout=0.0)  # fmt: skip
    eager, fused = build("eager"), build("fused")
    jax.tree.map(np.testing.assert_array_equal, eager.params, fused.params)  # same parameters either way
    inputs = _inputs(family)
    out = lambda m: m.model.apply(m.variables, **inputs)["logits"]
    np.testing.assert_allclose(out(fused), out(eager), atol=2e-6)
    with monkeypatch.context() as patch:  # each really takes its own path
        patch.setattr(layers, "attend", None)
        out(fused)
        patch.setattr(layers, "attend_fused", None)
        with pytest.raises(TypeError, match="'NoneType' object is not callable"):
            out(eager)
    batch = {**inputs, "labels": np.array([0, 1, 2, 1])}

    def step(loaded):  # dropout on (the residual branches'): the same RNG draws either way
        part = partition.build(loaded.params, rules.full(loaded), learning_rate=1e-2,
                               unused=task.unused_params(loaded.model, loaded.params, batch))  # fmt: skip
        state, metrics = jax.jit(make_train_step(loaded.model, part))(init_state(loaded.params, part.tx), batch)
        return metrics, state.params

    (m0, p0), (m1, p1) = step(eager), step(fused)
    assert float(m1["loss"]) == pytest.approx(float(m0["loss"]), abs=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m0["grad_norm"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p0)


def test_fused_attention_refuses_attention_dropout_and_unknown_names():
    with pytest.raises(ValueError, match=r"attention='fused' has no dropout .* attention_dropout is 0.1 .* pass "
                                         r"attention_dropout=0.0"):  # fmt: skip
        tm.from_config(CONFIGS["bert"], num_classes=3, attention="fused")  # BertConfig's 0.1 attention dropout
    with pytest.raises(ValueError, match=r"attention must be one of \['eager', 'fused'\], got 'flash'"):
        tm.from_config(CONFIGS["vit"], num_classes=3, attention="flash")
    with pytest.raises(ValueError, match="attention='fused' has no dropout"):
        tm.from_config(CONFIGS["clip"], num_classes=3, attention="fused", attention_dropout=0.2)
    assert tm.from_config(CONFIGS["vit"], num_classes=3, attention="fused").model.backbone.attention == "fused"


def _qkv_mask(t: int, causal: bool, dtype=jnp.float32):
    rng = np.random.default_rng(t)
    q, k, v = (jnp.asarray(rng.standard_normal((3, t, 2, 8)), dtype) for _ in range(3))
    keep = np.arange(t)[None, :] < np.array([t, t - 2, 1])[:, None]  # ragged right padding
    mask = jnp.asarray(keep[:, None, None, :])
    if causal:
        mask = mask & jnp.tril(jnp.ones((t, t), bool))[None, None]
    return q, k, v, mask


@pytest.mark.parametrize("t", [6, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_operands_give_the_same_attention_and_gradients(t, causal):
    """What `attend_fused` hands cuDNN (the mask as a full bias, odd lengths padded by a masked-out key) gives the
    same rows and gradients, checked here with XLA's implementation of the same function."""
    q, k, v, mask = _qkv_mask(t, causal)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    def padded(q, k, v):
        operands = layers.cudnn_operands(q, k, v, mask)
        assert operands[0].shape[1] % 2 == 0 and operands[3].shape == (3, 1, t + t % 2, t + t % 2)
        return jax.nn.dot_product_attention(*operands[:3], mask=operands[3], implementation="xla")[:, :t]

    np.testing.assert_allclose(padded(q, k, v), ref(q, k, v), atol=1e-6)
    loss = lambda f: lambda *a: (f(*a) * jnp.arange(8)).sum()
    grads = jax.grad(loss(padded), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *grads)
    no_mask = layers.cudnn_operands(q, k, v, None)[3]  # no bias unless a padded key must be masked out
    assert no_mask is None if t % 2 == 0 else no_mask.shape == (3, 1, t + 1, t + 1)


def test_cudnn_path_passes_jax_checks_for_the_benchmark_shapes(monkeypatch):
    """The shapes a GPU run trains (BERT-base 128 with a padding mask, ViT-B/16's 197, CLIP text's causal 77) pass
    the checks of JAX's cuDNN attention, forward and backward, traced on this CPU with the GPU queries stubbed, so
    the first GPU run does not find them (unpadded, 197 and 77 fail in training)."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)  # an H100: 9.0
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    causal = jnp.tril(jnp.ones((77, 77), bool))[None, None]
    for (b, t, heads), mask in [((32, 128, 12), jnp.ones((32, 1, 1, 128), bool)), ((32, 197, 12), None),
                                ((8, 77, 8), causal)]:  # fmt: skip
        q = jax.ShapeDtypeStruct((b, t, heads, 64), jnp.bfloat16)
        out = jax.eval_shape(lambda q, k, v, mask=mask: layers.attend_fused(q, k, v, mask), q, q, q)
        loss = lambda q, k, v, mask=mask: layers.attend_fused(q, k, v, mask).astype(jnp.float32).sum()
        grads = jax.eval_shape(jax.grad(loss, (0, 1, 2)), q, q, q)
        assert out.shape == (b, t, heads, 64) and [g.shape for g in grads] == [(b, t, heads, 64)] * 3
        jaxpr = str(jax.make_jaxpr(lambda q, k, v, mask=mask: layers.attend_fused(q, k, v, mask))(q, q, q))
        assert "custom_vjp_call" in jaxpr  # cuDNN's primitive, not XLA's softmax
    with pytest.raises(NotImplementedError, match="Unsupported sequence length Q 197"):  # why the padding is there
        jax.eval_shape(jax.grad(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn").astype(
            jnp.float32).sum()), jax.ShapeDtypeStruct((2, 197, 12, 64), jnp.bfloat16))  # fmt: skip
