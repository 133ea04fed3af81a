"""`tljax.models.products`: bf16 Dense products on XLA:CPU's bf16 kernels, the same results as `nn.Dense`."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from tljax.models.products import Dense, affine


def _loss_and_grads(module, params, x):
    loss = lambda p, x: jnp.square(module.apply(p, x).astype(jnp.float32)).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in a compiled module, read off the computation that holds it."""
    found = []
    for computation in re.split(r"\n(?=\S)", hlo):
        types = dict(re.findall(r"(param_[\d.]+): (\w+)\[", computation.splitlines()[0]))
        dots = re.findall(r" dot\(%([\w.]+), %([\w.]+)\)", computation)
        found += [(types.get(a, "?"), types.get(b, "?")) for a, b in dots]
    return found


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_computes_what_flax_dense_computes(dtype, use_bias):
    x = jax.random.normal(jax.random.key(0), (4, 16, 64), dtype)
    params = nn.Dense(48, use_bias=use_bias, dtype=dtype).init(jax.random.key(1), x)
    ours = _loss_and_grads(Dense(48, use_bias=use_bias, dtype=dtype), params, x)(params, x)
    plain = _loss_and_grads(nn.Dense(48, use_bias=use_bias, dtype=dtype), params, x)(params, x)
    if dtype == jnp.float32:  # the very same program
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), ours, plain))
        return
    # bf16: both accumulate products in float32 and round to bf16; the bias gradient, which nn.Dense's program sums
    # with bf16 partial sums, is summed in float32 and rounded once. Both against the float32 computation:
    wide = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    exact = _loss_and_grads(nn.Dense(48, use_bias=use_bias), *wide)(*wide)
    error = lambda got: [float(np.abs(np.float32(a) - np.float32(b)).max() / np.abs(np.float32(b)).max())
                         for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(exact), strict=True)]  # fmt: skip
    for ours_err, plain_err in zip(error(ours), error(plain), strict=True):
        assert ours_err <= max(plain_err, 2**-7)


def test_bf16_dense_runs_on_bf16_kernels_on_cpu():
    """Forward and both backward products of a bf16 Dense take bf16 operands, and its bias gradient is one plain
    reduction. With `nn.Dense`, XLA:CPU widened the products to float32 (at float32 speed or below) and summed the
    bias gradient through a float32 copy and a windowed reduction tree (a quarter of a bf16 MiniLM step)."""
    x = jnp.ones((16, 128, 64), jnp.bfloat16)
    ours, plain = Dense(32, dtype=jnp.bfloat16), nn.Dense(32, dtype=jnp.bfloat16)
    params = plain.init(jax.random.key(0), x)
    hlo = lambda m: _loss_and_grads(m, params, x).lower(params, x).compile().as_text()
    assert _dot_operand_dtypes(hlo(ours)) == [("bf16", "bf16")] * 3 and "reduce-window" not in hlo(ours)
    assert ("f32", "f32") in _dot_operand_dtypes(hlo(plain)) and "reduce-window" in hlo(plain)


def test_other_platforms_and_contractions_keep_the_plain_product():
    x, w = jnp.ones((8, 64), jnp.bfloat16), jnp.ones((64, 32), jnp.bfloat16)
    grads = jax.jit(jax.grad(lambda x, w: affine(x, w).astype(jnp.float32).sum(), argnums=(0, 1)))
    results = lambda platform: re.findall(
        r"stablehlo.dot_general.*?-> tensor<[\dx]*(\w+)>",
        export.export(grads, platforms=[platform])(x, w).mlir_module(),
    )
    assert results("cuda") == ["bf16", "bf16"]  # GPUs accumulate bf16 products in float32 natively
    assert results("cpu") == ["f32", "f32"]
    y = Dense(32, dtype=jnp.bfloat16, precision=jax.lax.Precision.HIGHEST).init_with_output(jax.random.key(0), x)[0]
    assert y.dtype == jnp.bfloat16


def test_peft_products_run_on_bf16_kernels_on_cpu(tiny_bert_dir):
    """LoRA's and the adapters' products go through `affine` too: weaving them into a bf16 model adds only
    bf16-operand products and no windowed bias-gradient reductions (before: float32 products and a reduce-window
    per adapter bias; adapters' bf16 MiniLM-L6 step 0.93x the time with this)."""
    import tljax.models as tm
    from tljax import peft

    base = tm.load_pretrained(tiny_bert_dir, num_classes=3, dtype="bfloat16")
    woven = peft.apply(base, [peft.Adapter(size=8), peft.LoRA(rank=4)])
    ids = jnp.ones((32, 64), jnp.int32)  # enough rows that XLA:CPU splits a bf16 sum into a windowed tree

    def hlo(loaded):
        def loss(p):
            out = loaded.model.apply({"params": p}, input_ids=ids, attention_mask=jnp.ones_like(ids), train=False)
            return jnp.square(out["logits"].astype(jnp.float32)).sum()

        return jax.jit(jax.grad(loss)).lower(loaded.params).compile().as_text()

    before, after = hlo(base), hlo(woven)
    assert "reduce-window" not in before and "reduce-window" not in after
    before, after = _dot_operand_dtypes(before), _dot_operand_dtypes(after)
    assert len(after) > len(before)  # LoRA's and the adapters' products, forward and backward
    assert [d for d in after if d != ("bf16", "bf16")] == [d for d in before if d != ("bf16", "bf16")]
