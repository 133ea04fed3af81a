"""Building blocks shared by the transformer families (BERT, ViT, CLIP).

Submodule names are part of the public parameter paths (`encoder/layer_3/attention/query/kernel`,
`encoder/layer_3/mlp/fc1/bias`, `encoder/layer_3/attention_norm/scale`), which partition rules match.
Every LayerNorm's name ends in `norm` so one regex (`norm/`) finds them all.

Regularisation options shared by the families' `build`: `dropout` / `attention_dropout` (None keeps the HF config's
rates) and `drop_path_rate` (stochastic depth; `DropPath`, `linear_rates`). Memory option `remat` (gradient
checkpointing of each block, `REMAT_POLICIES`): the backward pass recomputes what the forward did not keep.
"""

from __future__ import annotations

import copy
import functools
import numbers
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.dropout import Dropout
from tljax.models.products import Dense

Dtype = jnp.dtype


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
    """Exact GELU as PyTorch computes it, `x / 2 * (1 + erf(x / sqrt(2)))`. `jax.nn.gelu(approximate=False)` goes
    through erfc, whose two-branch polynomial XLA:CPU evaluates at ~3x the cost of erf's: a MiniLM-L6 training step
    (32 x 128, 2 devices) runs 3% faster this way, and more outputs equal PyTorch's bit for bit (float32: 63%
    against 41%; bfloat16: 92% against 55%, largest difference 1.5e-5 against 0.016). Half-precision inputs are
    computed in float32, as PyTorch's kernels do: `1 + erf` cancels for negative x."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (wide * 0.5 * (1.0 + jax.lax.erf(wide * np.float32(np.sqrt(0.5))))).astype(x.dtype)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "quick_gelu": quick_gelu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable:
    """The activation HF calls `name`; an unknown name is an error, never a silent substitute."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_rate(value, name: str) -> float:
    """A drop probability as a float; outside [0, 1) is an error (1 would drop everything and divide by zero)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def rate_option(value, default, name: str) -> float:
    """A `build` option overriding a config's dropout rate: None keeps `default` (the config's), a float replaces it."""
    return float(default or 0.0) if value is None else check_rate(value, name)


REMAT_POLICIES = {
    "none": None,  # keep every activation the backward pass needs (fastest, most memory)
    "block": jax.checkpoint_policies.nothing_saveable,  # keep block inputs only; recompute each block (HF's default)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection outputs; recompute attention
}


def check_remat(value) -> str:
    if value not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {value!r}")
    return value


# How a block computes softmax(q k^T / sqrt(d)) v (the `attention` option of the transformer families).
ATTENTION = {
    "eager": "materialised probabilities, as HF's eager attention (dropout on them; the fastest on CPU)",
    "fused": "jax.nn.dot_product_attention: cuDNN's fused kernel on a GPU in bf16/fp16, XLA's elsewhere; no dropout",
}


def check_attention(value, attention_dropout: float = 0.0) -> str:
    """`value` if it names an `ATTENTION` implementation that can apply `attention_dropout`, else a ValueError."""
    if value not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {value!r}")
    if value == "fused" and attention_dropout > 0:
        raise ValueError(
            f"attention='fused' has no dropout on the attention probabilities (jax.nn.dot_product_attention), but "
            f"this model's attention_dropout is {attention_dropout} (its config's attention dropout unless "
            f"overridden): pass attention_dropout=0.0 with it, or keep attention='eager'"
        )
    return value


def linear_rates(rate: float, n: int) -> tuple[float, ...]:
    """Stochastic-depth rates of n stacked blocks by timm's linear rule: block i gets `rate * i / (n - 1)`, so the
    first gets 0 and the last exactly `rate` (a single block gets 0, as timm's `linspace(0, rate, 1)`)."""
    return tuple(rate * (i / (n - 1)) if n > 1 else 0.0 for i in range(n))


def drop_path(x, rate: float, rng):
    """Stochastic depth (Huang et al. 2016): zeroes each example (index along axis 0) with probability `rate` and
    scales the kept ones by 1 / (1 - rate), so the expected output is `x`. Apply it to a residual branch."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    # A product, not x / (1 - rate): XLA rewrites that into this product anyway, so the scale is one exact value.
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), jnp.zeros_like(x))


class DropPath(nn.Module):
    """`drop_path` with the "dropout" RNG stream (timm's `DropPath`, big_vision's droplayer); the identity in
    inference (`deterministic=True`) or at rate 0, where it draws no randomness."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        return drop_path(x, self.rate, self.make_rng("dropout"))


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value/out projections (HF layout).

    `mask` is boolean, broadcastable to (batch, heads, q_len, kv_len), True where attention is allowed.
    `implementation`: an `ATTENTION` name (same parameters and outputs either way).
    """

    num_heads: int
    dropout: float = 0.0
    implementation: str = "eager"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x, mask=None, *, train: bool = False):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        dense = lambda name: Dense(
            width,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            name=name,
        )
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
        q, k, v = (split(dense(n)(x)) for n in ("query", "key", "value"))
        if check_attention(self.implementation, self.dropout) == "fused":
            return dense("out")(attend_fused(q, k, v, mask).reshape(*x.shape[:-1], width))
        drop = self.dropout > 0.0 and train
        probs_dropout = (lambda p: Dropout(self.dropout)(p, deterministic=False)) if drop else None
        return dense("out")(attend(q, k, v, mask, probs_dropout).reshape(*x.shape[:-1], width))


def attend(q, k, v, mask=None, probs_dropout: Callable | None = None):
    """softmax(q k^T / sqrt(d)) v over (batch, length, heads, head_dim) inputs, as HF's eager attention computes it.

    The products run head-major, (batch, heads, length, head_dim), with the transposes written out: XLA:CPU runs the
    same batched products in the (batch, length, heads) layout 1.5-2x slower (`jax.nn.dot_product_attention`'s, or
    einsums over it), about a tenth of a ViT-B/16 step. Logits and softmax in float32 whatever the compute dtype
    (as `jax.nn.dot_product_attention`); `mask` (True: attend) broadcasts to (batch, heads, q_len, kv_len);
    `probs_dropout` (training) applies to the attention probabilities.
    """
    q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))
    logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if probs_dropout is not None:
        probs = probs_dropout(probs)
    return jnp.matmul(probs, v).swapaxes(1, 2)


def attend_fused(q, k, v, mask=None):
    """`attend` without dropout through `jax.nn.dot_product_attention`: on a GPU in bf16/fp16 cuDNN's fused (flash)
    kernel, which never writes the (q_len, kv_len) probabilities to memory (operands from `cudnn_operands`); elsewhere
    XLA's implementation of the same math (float32 logits and softmax), slower than `attend` on CPU."""
    if not (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    length = q.shape[1]
    q, k, v, mask = cudnn_operands(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")[:, :length]


def cudnn_operands(q, k, v, mask=None):
    """(q, k, v, mask) as cuDNN's fused attention takes them, with the same result on the first q_len rows: the mask as
    a bias of the full (q_len, kv_len) extent, and odd lengths (ViT-B/16's 197, CLIP's 77) padded by one masked-out
    key (and one query row, dropped after): JAX's cuDNN training rule counts a bias as present even where there is
    none, and refuses odd lengths with a bias (jax 0.10)."""
    if q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0:
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
        return q, k, v, mask
    (b, t), s = q.shape[:2], k.shape[1]
    full = jnp.broadcast_to(True if mask is None else mask, (b, 1, t, s))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))
    q, k, v = pad(q), pad(k), pad(v)
    full = jnp.pad(full, ((0, 0), (0, 0), (0, q.shape[1] - t), (0, k.shape[1] - s)))  # the padded key: masked out
    pad_rows = (jnp.arange(q.shape[1]) >= t)[:, None] & (jnp.arange(k.shape[1]) < s)[None, :]
    return q, k, v, full | pad_rows  # a padded query row attends to the real keys (its output is dropped)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (BERT's intermediate/output dense, ViT's and CLIP's mlp)."""

    hidden: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: Dense(
            n, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name
        )
        return dense(x.shape[-1], "fc2")(activation(self.act)(dense(self.hidden, "fc1")(x)))


class Block(nn.Module):
    """A transformer encoder layer, post-norm (BERT) or pre-norm (ViT, CLIP).

    `drop_path` drops each residual branch (attention, MLP) per example in training (`DropPath`).
    """

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    pre_norm: bool = True
    eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    attention: str = "eager"  # an `ATTENTION` name
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):  # `train` positional: `nn.remat` needs it static
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(epsilon=self.eps, name=name, **kw)
        det = not train
        drop = lambda y: DropPath(self.drop_path)(Dropout(self.dropout)(y, deterministic=det), deterministic=det)
        attn = Attention(self.num_heads, self.attention_dropout, self.attention, name="attention", **kw)
        mlp = Mlp(self.mlp_dim, self.act, name="mlp", **kw)
        if self.pre_norm:
            x = x + drop(attn(norm("attention_norm")(x), mask, train=train))
            return x + drop(mlp(norm("mlp_norm")(x)))
        x = norm("attention_norm")(x + drop(attn(x, mask, train=train)))
        return norm("mlp_norm")(x + drop(mlp(x)))


class Encoder(nn.Module):
    """A stack of `Block`s named `layer_0 ... layer_{n-1}`; block i drops paths at `linear_rates(...)[i]`."""

    num_layers: int
    block: Callable[..., Block]
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, mask=None, *, train: bool = False):
        rates = linear_rates(self.drop_path_rate, self.num_layers)
        for i in range(self.num_layers):
            x = self.block(name=f"layer_{i}", drop_path=rates[i])(x, mask, train)
        return x


def encoder(
    num_layers: int,
    num_heads: int,
    mlp_dim: int,
    act: str,
    *,
    pre_norm: bool,
    eps: float,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    remat: str = "none",
    attention: str = "eager",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> Encoder:
    """The family encoders (BERT post-norm, ViT and CLIP pre-norm) as one `Encoder` named "encoder"; call it inside
    a compact `__call__` as `encoder(...)(x, mask, train=train)`.

    Args:
      drop_path_rate: stochastic depth of the deepest layer; layer i drops its residual branches with probability
        `drop_path_rate * i / (num_layers - 1)` (timm's linear rule: layer 0 never, the last at the full rate).
      remat: a `REMAT_POLICIES` name; each block under `nn.remat` with that policy (parameter paths unchanged, outputs
        and gradients equal; only what the backward pass stores, and so memory and step time, change).
      attention: an `ATTENTION` implementation ("eager" or "fused"); the parameters are the same.
    """
    cls = Block
    if check_remat(remat) != "none":
        cls = nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(3,))  # (self, x, mask, train)
    block = functools.partial(
        cls,
        num_heads,
        mlp_dim,
        act,
        pre_norm=pre_norm,
        eps=eps,
        dropout=dropout,
        attention_dropout=attention_dropout,
        attention=check_attention(attention, attention_dropout),
        dtype=dtype,
        param_dtype=param_dtype,
    )
    return Encoder(num_layers, block, drop_path_rate, name="encoder")


class Pooler(nn.Module):
    """act(dense(first token)): BERT's and ViT's `pooler_output` (tanh unless the config says otherwise)."""

    width: int
    act: str = "tanh"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")
        return activation(self.act)(dense(x[:, 0]))


def check_transformer_config(c, what: str = "config") -> None:
    """Options the shared blocks do not implement are errors at build time, never silently different numbers."""
    activation(c.hidden_act)
    if c.hidden_size % c.num_attention_heads:
        raise ValueError(
            f"{what}: hidden_size={c.hidden_size} is not divisible by num_attention_heads={c.num_attention_heads}"
        )
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"{what}: head_dim={head_dim} is not supported (must equal hidden_size / num_attention_heads)")


def padding_mask(attention_mask):
    """(batch, kv_len) 0/1 mask -> boolean (batch, 1, 1, kv_len) for `jax.nn.dot_product_attention`."""
    return attention_mask.astype(bool)[:, None, None, :]


# The layer structure shared by BERT and ViT (families assign these as their contract functions).


def num_hidden_layers(hf_config) -> int:
    return hf_config.num_hidden_layers


def with_num_hidden_layers(hf_config, n: int):
    """A copy of the config with its first n blocks (what `from_pretrained(..., num_hidden_layers=n)` builds)."""
    out = copy.deepcopy(hf_config)
    out.num_hidden_layers = n
    return out


def hidden_size(hf_config) -> int:
    return hf_config.hidden_size


def layer_id_by_prefix(path: str, n_layers: int, stem: tuple[str, ...], block: str) -> int:
    """Depth of a parameter for layer-wise LR decay: paths under a `stem` prefix 0, `{block}{i}/...` i+1, the rest
    (final norms, poolers, projections, heads) n_layers+1. Every family's `layer_id` is this with its prefixes."""
    if path.startswith(stem):
        return 0
    if path.startswith(block):
        return int(path[len(block) :].split("/")[0]) + 1
    return n_layers + 1


def encoder_layer_id(path: str, n_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: embeddings 0, `encoder/layer_i` i+1, above n_layers+1."""
    return layer_id_by_prefix(path, n_layers, ("embeddings/",), "encoder/layer_")


def encoder_block_regex(i: int) -> str:
    """Regex for every parameter of transformer block i."""
    return rf"^encoder/layer_{i}/"
