"""Dense layers in bfloat16 that XLA:CPU runs on its bfloat16 kernels, forward and backward.

Two things make a bf16 `nn.Dense` slow on XLA:CPU, slower than float32. Its product returns bf16, which XLA:CPU widens
to a float32 product (YNNPACK's bf16 kernels take only products that accumulate into float32: 2-core AMD EPYC with
AVX512-BF16, 1024-2048 square, bf16 -> bf16 276-341 GFLOP/s, bf16 -> f32 626-769, f32 375-398). And the bias gradient
is a bf16 sum, which XLA:CPU computes as a float32 copy of the cotangent and a windowed reduction tree (about a
quarter of a bf16 MiniLM-L6 step). `affine` states both in the form that runs fast: products that accumulate in
float32 in the forward pass and in both backward products (a custom VJP), and a bias gradient summed from float32;
every result is rounded to bf16 as before, so results match `nn.Dense` up to the order of the float32 sums (the bias
gradient more closely: `nn.Dense`'s program keeps bf16 partial sums). A bf16 MiniLM-L6 training step on CPU (32 x 128,
2 devices) went from 1.13x to 0.71x the float32 step's time (ViT-B/16 at 224 x 224: 1.11x to 0.65x). On other platforms
(GPUs accumulate bf16 products in float32 natively) and for other dtypes it is `nn.Dense`'s computation. The
attention's batched products stay as they are (in this form their backward was 3-7% slower: the float32 logits'
cotangent costs a conversion pass).

`Dense` is `nn.Dense` (same fields, parameters and call) computing through `affine`; the transformer blocks build
their projections and MLPs with it (PEFT's LoRA and adapters their products with `affine`), and PEFT's method
interception sees an `nn.Dense`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _dims(x) -> tuple:
    """x (..., k) @ w (k, n): the last axis of `x` with the first of `w`."""
    return ((x.ndim - 1,), (0,)), ((), ())


def _contract(a, b, dimension_numbers):
    return lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _bf16_product(x, w):
    return _contract(x, w, _dims(x)).astype(x.dtype)


def _bf16_product_fwd(x, w):
    return _bf16_product(x, w), (x, w)


def _bf16_product_bwd(residuals, g):
    x, w = residuals
    lead = tuple(range(x.ndim - 1))  # the weight's gradient sums over every leading axis, stated as one contraction
    dx = _contract(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    dw = _contract(x, g, ((lead, lead), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


@jax.custom_vjp
def _add_bias(y, b):
    return y + b


def _add_bias_fwd(y, b):
    return y + b, None


def _add_bias_bwd(_, g):
    return g, jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1))).astype(g.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _plain(x, w, b):
    y = lax.dot_general(x, w, _dims(x))
    return y if b is None else y + b


def _bf16_cpu(x, w, b):
    y = _bf16_product(x, w)
    return y if b is None else _add_bias(y, b)


def affine(x, w, b=None):
    """`x @ w + b` for `x` (..., k), `w` (k, n), `b` (n,) or None, as `nn.Dense` computes it; in bf16 on CPU through
    the bf16 kernels, forward and backward."""
    if not (x.dtype == w.dtype == jnp.bfloat16 and (b is None or b.dtype == jnp.bfloat16)):
        return _plain(x, w, b)
    return lax.platform_dependent(x, w, b, cpu=_bf16_cpu, default=_plain)


class Dense(nn.Dense):
    """`nn.Dense` computing through `affine` (a custom `precision` or `dot_general` takes `nn.Dense`'s own path)."""

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if self.precision is None and self.dot_general is None and self.dot_general_cls is None:
            return affine(inputs, kernel, bias)
        dot_general = self.dot_general_cls() if self.dot_general_cls is not None else self.dot_general
        y = (dot_general or lax.dot_general)(inputs, kernel, _dims(inputs), precision=self.precision)
        return y if bias is None else y + bias
