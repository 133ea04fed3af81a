"""tljax's dropout draws flax's masks bit for bit, as one fused kernel (no rolled threefry loop on CPU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.models.dropout import Dropout, bernoulli, random_bits

KEYS = {
    "typed": jax.random.key(0),
    "raw": jax.random.PRNGKey(7),
    "folded": jax.random.fold_in(jax.random.key(3), 11),
}


@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
@pytest.mark.parametrize("shape", [(5,), (4, 3, 7), (2, 3, 16, 16), ()])
def test_bits_and_bernoulli_equal_jax_random(key, shape):
    np.testing.assert_array_equal(random_bits(key, shape), jax.random.bits(key, shape))
    for p in (0.1, 0.5, 0.9, 0.999):
        np.testing.assert_array_equal(bernoulli(key, p, shape), jax.random.bernoulli(key, p, shape))


def test_other_prng_implementations_go_through_jax_random():
    key = jax.random.key(1, impl="rbg")
    assert random_bits(key, (8,)) is None
    np.testing.assert_array_equal(bernoulli(key, 0.7, (64,)), jax.random.bernoulli(key, 0.7, (64,)))


@pytest.mark.parametrize("rate,broadcast_dims", [(0.1, ()), (0.5, (1,)), (0.3, (-1, 0)), (0.0, ()), (1.0, ())])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_equals_flax_dropout(rate, broadcast_dims, dtype):
    x = jax.random.normal(jax.random.key(1), (4, 3, 5, 7)).astype(dtype)
    for key in KEYS.values():
        want = nn.Dropout(rate, broadcast_dims).apply({}, x, deterministic=False, rngs={"dropout": key})
        got = Dropout(rate, broadcast_dims).apply({}, x, deterministic=False, rngs={"dropout": key})
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert Dropout(rate).apply({}, x, deterministic=True) is x


def test_mask_compiles_without_a_loop():
    """The point of the module: jax.random.bernoulli's CPU lowering is a rolled 5-step loop XLA cannot fuse (a
    dozen full-size memory passes per mask); the unrolled hash compiles to straight-line fused code."""
    key, shape = jax.random.key(0), (8, 4, 32, 32)
    hlo = lambda f: jax.jit(f).lower(key).compile().as_text()
    if jax.devices()[0].platform == "cpu":
        assert " while(" in hlo(lambda k: jax.random.bernoulli(k, 0.9, shape))
    assert " while(" not in hlo(lambda k: bernoulli(k, 0.9, shape))
