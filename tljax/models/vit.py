"""Vision Transformer (any HF `ViTConfig`, model_type "vit") as a linen module matching transformers' `ViTModel`.

Parameter layout: `embeddings/{cls_token,position_embeddings,patch_embeddings/{kernel,bias}}`,
`encoder/layer_{i}/{attention_norm,attention/{query,key,value,out},mlp_norm,mlp/{fc1,fc2}}` (pre-norm),
`final_norm`, and `pooler/dense` when the checkpoint has a pooler (`ViTModel` does, `ViTForImageClassification`
does not).

Fine-tuning at another resolution: `load_pretrained(path, image_size=384)` builds the position table for the new
patch grid and `adapt` resamples the checkpoint's table into it with the same bicubic interpolation as HF's
`interpolate_pos_encoding` (the CLS row is kept). `build` then sets `hf_config.image_size` to the new size, so
`save_pretrained` writes a config that describes the saved weights and HF's `ViTModel.from_pretrained` reads them
back as they are. Without resampling at load time, `model.apply(..., interpolate_pos_encoding=True)` resizes the
table on every call instead, as HF's forward option does.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models import layers
from tljax.models.convert import CONV, HfClassifier, KeyMap, KeyRule, dense_rules, norm_rules
from tljax.models.dropout import Dropout

MODEL_TYPES = ("vit",)
PREFIXES = ("vit.",)  # base-model prefix of ViTForImageClassification / ViTForMaskedImageModeling checkpoints
DEFAULT_POOLING = "cls"  # ViTForImageClassification classifies from the final-normed CLS token, not the pooler
STEM_REGEX = r"^embeddings/"  # parameters at depth 0 (below block 0)
# Dropped on purpose and reported: task heads, and the masked-image-modeling mask token (a real parameter, but
# only used with `bool_masked_pos`, which fine-tuning never passes).
IGNORE = (r"^classifier\.", r"^decoder\.", r"embeddings\.mask_token$")

Pair = tuple[int, int]


def _pair(x) -> Pair:
    """HF accepts an int or an (h, w) sequence for `image_size` / `patch_size`."""
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def check_image_size(image_size, patch_size, name: str = "image_size") -> None:
    """A size (int or (h, w)) of at least one patch on each side: a smaller one has no patch grid to embed."""
    (h, w), (ph, pw) = _pair(image_size), _pair(patch_size)
    if h < ph or w < pw:
        raise ValueError(f"{name}={image_size!r} is smaller than one {ph}x{pw} patch: use at least {ph}x{pw}")


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
    """PyTorch's bicubic convolution weights (A = -0.75) for the 4 taps at offsets -1, 0, 1, 2 from floor(x)."""
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch's 1-D bicubic resize (align_corners=False, no antialias, edge-clamped taps).

    Resizing a grid with one such matrix per axis reproduces `F.interpolate(mode="bicubic")`, which HF's
    `interpolate_pos_encoding` uses; at n_in == n_out it is exactly the identity.
    """
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    lo = np.floor(x).astype(np.int64)
    out = np.zeros((n_out, n_in), np.float64)
    for k, w in enumerate(_cubic_weights(x - lo)):
        np.add.at(out, (np.arange(n_out), np.clip(lo - 1 + k, 0, n_in - 1)), w)
    return out


def resample_grid(grid, new: Pair, xp=np):
    """(h, w, dim) position grid -> (new_h, new_w, dim), bicubic as in HF's `interpolate_pos_encoding`."""
    mh, mw = bicubic_matrix(grid.shape[0], new[0]), bicubic_matrix(grid.shape[1], new[1])
    if xp is np:
        return np.einsum("ah,hwd,bw->abd", mh, np.asarray(grid, np.float64), mw)
    mh, mw = (jnp.asarray(m, grid.dtype) for m in (mh, mw))
    return jnp.einsum("ah,hwd,bw->abd", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)


def resample_table(table, old: Pair, new: Pair, xp=np):
    """(1, 1 + h*w, dim) CLS + patch position table -> (1, 1 + new_h*new_w, dim); the CLS row is kept."""
    dim = table.shape[-1]
    grid = resample_grid(table[0, 1:].reshape(*old, dim), new, xp)
    return xp.concatenate([table[:, :1].astype(grid.dtype), grid.reshape(1, -1, dim)], axis=1)


class Embeddings(nn.Module):
    """Patch projection (a strided conv) + CLS token + learned position table (dropout is applied by the caller)."""

    width: int
    image_size: Pair
    patch_size: Pair
    num_channels: int = 3
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def grid(self) -> Pair:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @nn.compact
    def __call__(self, pixel_values, interpolate_pos_encoding: bool = False):
        self._check_input(pixel_values.shape, interpolate_pos_encoding)
        x = jnp.transpose(jnp.asarray(pixel_values, self.dtype), (0, 2, 3, 1))  # NCHW (HF) -> NHWC
        x = nn.Conv(
            self.width,
            self.patch_size,
            strides=self.patch_size,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embeddings",
        )(x)
        b, h, w, d = x.shape
        init = nn.initializers.truncated_normal(self.init_std)
        cls = self.param("cls_token", init, (1, 1, d), self.param_dtype)
        pos = self.param("position_embeddings", init, (1, 1 + self.grid[0] * self.grid[1], d), self.param_dtype)
        pos = jnp.asarray(pos, self.dtype)
        if (h, w) != self.grid:
            pos = resample_table(pos, self.grid, (h, w), xp=jnp)
        cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, d))
        return jnp.concatenate([cls, x.reshape(b, h * w, d)], axis=1) + pos

    def _check_input(self, shape, interpolate: bool) -> None:
        if len(shape) != 4 or shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must be NCHW with {self.num_channels} channels (HF layout), got shape {tuple(shape)}"
            )
        if interpolate:
            check_image_size(tuple(shape[2:]), self.patch_size, "input image size")
        elif tuple(shape[2:]) != self.image_size:
            raise ValueError(
                f"input image size {shape[2]}x{shape[3]} does not match the model's "
                f"{self.image_size[0]}x{self.image_size[1]}; pass interpolate_pos_encoding=True, or "
                "load with image_size=... to resample the position table once"
            )


class ViTModel(nn.Module):
    """HF `ViTModel`: `pixel_values` (NCHW) in, `last_hidden_state` (+ `pooler_output`) out."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: Pair = (224, 224)
    patch_size: Pair = (16, 16)
    num_channels: int = 3
    act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth of the last layer (`layers.encoder`)
    remat: str = "none"  # gradient checkpointing of each block (`layers.REMAT_POLICIES`)
    attention: str = "eager"  # `layers.ATTENTION`: "eager" or "fused"
    init_std: float = 0.02
    add_pooling_layer: bool = True
    pooler_size: int | None = None  # None: hidden_size
    pooler_act: str = "tanh"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, *, pixel_values, interpolate_pos_encoding: bool = False, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Embeddings(
            self.hidden_size,
            self.image_size,
            self.patch_size,
            self.num_channels,
            self.init_std,
            name="embeddings",
            **kw,
        )(pixel_values, interpolate_pos_encoding)
        x = Dropout(self.dropout)(x, deterministic=not train)
        encoder = layers.encoder(
            self.num_layers,
            self.num_heads,
            self.intermediate_size,
            self.act,
            pre_norm=True,
            eps=self.eps,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            drop_path_rate=self.drop_path_rate,
            remat=self.remat,
            attention=self.attention,
            **kw,
        )
        x = encoder(x, train=train)
        x = nn.LayerNorm(self.eps, name="final_norm", **kw)(x)
        out = {"last_hidden_state": x}
        if self.add_pooling_layer:
            out["pooler_output"] = layers.Pooler(
                self.pooler_size or self.hidden_size, self.pooler_act, name="pooler", **kw
            )(x)
        return out


def _check_supported(c) -> None:
    """Options the linen model does not implement are errors, never silently different numbers."""
    layers.check_transformer_config(c)
    if not getattr(c, "qkv_bias", True):
        raise ValueError("qkv_bias=False is not supported (layers.Attention has biases on query/key/value)")


def build(
    hf_config,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    checkpoint_keys=(),
    add_pooling_layer: bool | None = None,
    image_size: int | tuple[int, int] | None = None,
    drop_path_rate: float = 0.0,
    dropout: float | None = None,
    attention_dropout: float | None = None,
    remat: str = "none",
    attention: str = "eager",
) -> ViTModel:
    """The linen module for an HF `ViTConfig`.

    Args:
      add_pooling_layer: None means "if the checkpoint has pooler weights".
      image_size: fine-tuning resolution (int or (h, w)); None keeps `hf_config.image_size`. A different size
        gives the model a position table for the new patch grid, which `adapt` fills by resampling the
        checkpoint's. It also sets `hf_config.image_size` (in place) so that `dummy_inputs` and `save_pretrained`
        describe the model that was built.
      drop_path_rate: stochastic depth (per-example residual-branch drop in training), linear over layers from 0 to
        this rate at the last (`layers.encoder`); 0 leaves the model as HF's.
      dropout, attention_dropout: override `hidden_dropout_prob` / `attention_probs_dropout_prob` (None keeps the
        config's); the config itself is not changed.
      remat: gradient checkpointing of each block (`layers.REMAT_POLICIES`: "none", "block", "dots"); same
        outputs and gradients, less activation memory, more compute.
      attention: "eager" (HF's eager attention, the default) or "fused" (`jax.nn.dot_product_attention`: cuDNN's
        flash kernel on a GPU in bf16; no dropout on the attention probabilities, so it needs attention_dropout=0).
    """
    c = hf_config
    _check_supported(c)
    if image_size is not None and _pair(image_size) != _pair(c.image_size):
        check_image_size(image_size, c.patch_size)
        c.image_size = image_size
    if add_pooling_layer is None:
        add_pooling_layer = any(k.startswith("pooler.") for k in checkpoint_keys) or not checkpoint_keys
    attn_rate = layers.rate_option(attention_dropout, c.attention_probs_dropout_prob, "attention_dropout")
    return ViTModel(
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        image_size=_pair(c.image_size),
        patch_size=_pair(c.patch_size),
        num_channels=c.num_channels,
        act=c.hidden_act,
        eps=c.layer_norm_eps,
        dropout=layers.rate_option(dropout, c.hidden_dropout_prob, "dropout"),
        attention_dropout=attn_rate,
        drop_path_rate=layers.check_rate(drop_path_rate, "drop_path_rate"),
        remat=layers.check_remat(remat),
        attention=layers.check_attention(attention, attn_rate),
        init_std=c.initializer_range,
        add_pooling_layer=add_pooling_layer,
        pooler_size=getattr(c, "pooler_output_size", None),
        pooler_act=getattr(c, "pooler_act", "tanh"),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def dummy_inputs(hf_config) -> dict:
    """One image at the configured resolution (builds every parameter in `init` / `jax.eval_shape`)."""
    h, w = _pair(hf_config.image_size)
    return {"pixel_values": np.zeros((1, hf_config.num_channels, h, w), np.float32)}


def adapt(converted: dict, shapes: dict, hf_config, prefix: str) -> dict[str, str]:
    """Resamples the checkpoint's position table when the model was built for another patch grid.

    The checkpoint's grid is taken as square (as HF's `interpolate_pos_encoding` does); the model's grid comes from
    its parameter shape and `hf_config`. Modifies `converted` in place.

    Returns:
      {path: "resampled 14x14 -> 24x24"} for each resampled table; empty when nothing changed.
    """
    path = f"params/{prefix}embeddings/position_embeddings"
    if path not in converted or path not in shapes:
        return {}
    table, want = converted[path], shapes[path].shape
    if table.shape == want or table.ndim != 3 or table.shape[-1] != want[-1]:
        return {}  # equal, or a mismatch resampling cannot fix: the strict merge reports it
    old, new = _checkpoint_grid(table.shape[1] - 1), _model_grid(hf_config)
    if new[0] * new[1] + 1 != want[1]:
        raise ValueError(f"position table {want} does not match the {new[0]}x{new[1]} grid of the config")
    converted[path] = resample_table(table, old, new).astype(table.dtype)
    return {path: f"resampled {old[0]}x{old[1]} -> {new[0]}x{new[1]}"}


def _checkpoint_grid(num_patches: int) -> Pair:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"cannot resample a position table of {num_patches} patches: not a square grid")
    return side, side


def _model_grid(hf_config) -> Pair:
    (h, w), (ph, pw) = _pair(hf_config.image_size), _pair(hf_config.patch_size)
    return h // ph, w // pw


num_layers, feature_dim = layers.num_hidden_layers, layers.hidden_size
with_num_layers = layers.with_num_hidden_layers  # truncation: load_pretrained(num_layers=n)
layer_id, block_regex = layers.encoder_layer_id, layers.encoder_block_regex


def key_map(hf_config) -> KeyMap:
    """Torch keys as `save_pretrained` writes them (the hub layout: `encoder.layer.{i}.attention.attention.*`)."""
    L, P = "encoder.layer.{i}.", "params/encoder/layer_{i}/"
    rules = [KeyRule(f"embeddings.{n}", f"params/embeddings/{n}") for n in ("cls_token", "position_embeddings")]
    rules += [
        KeyRule("embeddings.patch_embeddings.projection.weight", "params/embeddings/patch_embeddings/kernel", CONV),
        KeyRule("embeddings.patch_embeddings.projection.bias", "params/embeddings/patch_embeddings/bias"),
    ]
    pairs = [
        ("attention.attention.query", "attention/query"),
        ("attention.attention.key", "attention/key"),
        ("attention.attention.value", "attention/value"),
        ("attention.output.dense", "attention/out"),
        ("intermediate.dense", "mlp/fc1"),
        ("output.dense", "mlp/fc2"),
    ]
    for torch_name, flax_name in pairs:
        rules += dense_rules(L + torch_name, P + flax_name)
    rules += norm_rules(L + "layernorm_before", P + "attention_norm")
    rules += norm_rules(L + "layernorm_after", P + "mlp_norm")
    rules += norm_rules("layernorm", "params/final_norm")
    rules += dense_rules("pooler.dense", "params/pooler/dense")
    return KeyMap(rules)


def classifier(hf_config) -> HfClassifier:
    """ViTForImageClassification: a linear classifier on the final-normed CLS token."""
    return HfClassifier(
        "ViTForImageClassification", "vit.", "cls", 0, tuple(dense_rules("classifier", "params/head/out"))
    )
