"""ResNet (any HF `ResNetConfig`, e.g. microsoft/resnet-50) as a linen module with BatchNorm.

Parameter layout (every conv+BatchNorm pair is one `ConvNorm`, HF's `ResNetConvLayer`):
`embedder/{conv,norm}`, `stage_{s}/block_{b}/conv_{k}/{conv,norm}`, `stage_{s}/block_{b}/shortcut/{conv,norm}`.
Conv kernels are HWIO without bias; BatchNorm keeps `scale`/`bias` in "params" and `mean`/`var` in "batch_stats".

Outputs differ in layout from HF on purpose (channels-last is what XLA convs want): `last_hidden_state` is NHWC
(B, H, W, C) where HF gives NCHW, and `pooler_output` is (B, C) where HF gives (B, C, 1, 1).

BatchNorm modes:
- `train=False`: running statistics (HF `.eval()`).
- `train=True`: batch statistics; the updated running statistics come back with `mutable=["batch_stats"]`
  (momentum 0.9 here == torch momentum 0.1). `BatchNorm` below follows torch's rule exactly: normalise with the
  biased batch variance, fold the *unbiased* one (x n/(n-1), n = B*H*W) into `running_var` (see
  `tljax.models.batchnorm`).
- BatchNorm layers whose scale and bias a training phase freezes run in inference mode (running statistics, not
  updated), as Keras does for non-trainable layers: the training step sets this per layer
  (`tljax.models.batchnorm.running_average`; `frozen_batchnorm="train"` in the engine config turns it off).
- `freeze_bn_stats=True` (build option): running statistics always, also under `train=True` (the usual choice when
  fine-tuning with small batches); `mutable` is then not needed.

`drop_path_rate` (build option, timm's ResNet option of that name): under `train=True` each block's residual branch
is dropped per example (`layers.DropPath`, "dropout" RNG stream), linearly from 0 at the first block to the rate at
the last, counted over all stages. HF's ResNet has no stochastic depth, so 0 (the default) keeps parity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models import layers
from tljax.models.batchnorm import BatchNorm
from tljax.models.convert import CONV, HfClassifier, KeyMap, KeyRule, dense_rules

MODEL_TYPES = ("resnet",)
PREFIXES = ("resnet.",)  # base-model prefix of ResNetForImageClassification checkpoints
DEFAULT_POOLING = "pooler"
STEM_REGEX = r"^embedder/"  # parameters at depth 0 (below stage 0)
# Dropped on purpose and reported: the ImageNet classifier and torch's BatchNorm step counters (unused with momentum).
IGNORE = (r"^classifier\.", r"num_batches_tracked$")
LAYER_TYPES = ("basic", "bottleneck")
BOTTLENECK_REDUCTION = 4  # HF's ResNetBottleNeckLayer(reduction=4)
# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"), HF's conv init.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated in jax


class ConvNorm(nn.Module):
    """conv (no bias, torch's symmetric `kernel // 2` padding) -> BatchNorm -> activation: HF's `ResNetConvLayer`."""

    features: int
    kernel: int = 3
    stride: int = 1
    act: Callable | None = jax.nn.relu
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, use_running_average: bool):
        pad = self.kernel // 2
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.stride,
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=CONV_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        x = BatchNorm(
            use_running_average=use_running_average,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="norm",
        )(x)
        return x if self.act is None else self.act(x)


class Block(nn.Module):
    """A residual block ("basic": 3x3, 3x3; "bottleneck": 1x1, 3x3, 1x1), projected shortcut when shapes change.

    As in HF, the convolutions inside the block always use relu; `act` (config.hidden_act) is applied after the sum.
    In training the branch (not the shortcut) is dropped per example with probability `drop_path`, as in timm.
    """

    features: int
    stride: int = 1
    layer_type: str = "bottleneck"
    downsample_in_bottleneck: bool = False
    act: str = "relu"
    drop_path: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, use_running_average: bool, train: bool = False):
        unit = lambda f, k, s, act, name: ConvNorm(
            f, k, s, act, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        residual = x
        if x.shape[-1] != self.features or self.stride != 1:
            residual = unit(self.features, 1, self.stride, None, "shortcut")(x, use_running_average=use_running_average)
        for k, (features, kernel, stride, relu) in enumerate(self._convs()):
            x = unit(features, kernel, stride, jax.nn.relu if relu else None, f"conv_{k}")(
                x, use_running_average=use_running_average
            )
        x = layers.DropPath(self.drop_path)(x, deterministic=not train)
        return layers.activation(self.act)(x + residual)

    def _convs(self) -> list[tuple[int, int, int, bool]]:
        """(features, kernel, stride, relu) per conv; the stride sits on the 3x3 unless downsample_in_bottleneck."""
        if self.layer_type == "basic":
            return [(self.features, 3, self.stride, True), (self.features, 3, 1, False)]
        mid = self.features // BOTTLENECK_REDUCTION
        s0, s1 = (self.stride, 1) if self.downsample_in_bottleneck else (1, self.stride)
        return [(mid, 1, s0, True), (mid, 3, s1, True), (self.features, 1, 1, False)]


class Stage(nn.Module):
    """`depth` blocks named `block_0 ...`; only the first one strides; block b drops paths at `drop_paths[b]`."""

    features: int
    depth: int
    stride: int
    block: Callable[..., Block]
    drop_paths: Sequence[float]  # one rate per block

    @nn.compact
    def __call__(self, x, *, use_running_average: bool, train: bool = False):
        for b in range(self.depth):
            rate = self.drop_paths[b]
            x = self.block(self.features, self.stride if b == 0 else 1, name=f"block_{b}", drop_path=rate)(
                x, use_running_average=use_running_average, train=train
            )
        return x


class ResNetModel(nn.Module):
    """HF `ResNetModel`: NCHW `pixel_values` in; NHWC `last_hidden_state` and (B, C) `pooler_output` out."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: Sequence[int] = (256, 512, 1024, 2048)
    depths: Sequence[int] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    freeze_bn_stats: bool = False
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear over all blocks)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, *, pixel_values, train: bool = False):
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must be NCHW with {self.num_channels} channels (HF layout), got shape "
                f"{pixel_values.shape}"
            )
        running = not train or self.freeze_bn_stats
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.transpose(pixel_values, (0, 2, 3, 1))
        x = ConvNorm(self.embedding_size, 7, 2, layers.activation(self.act), name="embedder", **kw)(
            x, use_running_average=running
        )
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf, like torch
        block = lambda features, stride, name, drop_path: Block(
            features, stride, self.layer_type, self.downsample_in_bottleneck, self.act, drop_path, name=name, **kw
        )
        rates = layers.linear_rates(self.drop_path_rate, sum(self.depths))
        for s, (features, depth) in enumerate(zip(self.hidden_sizes, self.depths, strict=True)):
            stride = 2 if s > 0 or self.downsample_in_first_stage else 1
            first = sum(self.depths[:s])
            stage = Stage(features, depth, stride, block, rates[first : first + depth], name=f"stage_{s}")
            x = stage(x, use_running_average=running, train=train)
        return {"last_hidden_state": x, "pooler_output": x.mean(axis=(1, 2))}


def build(
    hf_config,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    checkpoint_keys=(),
    freeze_bn_stats: bool = False,
    drop_path_rate: float = 0.0,
) -> ResNetModel:
    """The linen module for an HF `ResNetConfig`.

    Args:
      freeze_bn_stats: BatchNorm always normalises with the running statistics and never updates them, also under
        `train=True` (dropout in a head and drop path still train).
      drop_path_rate: stochastic depth: block i of n (over all stages) drops its residual branch per example in
        training with probability `drop_path_rate * i / (n - 1)` (timm's linear rule); 0 leaves the model as HF's.
    """
    c = hf_config
    if c.layer_type not in LAYER_TYPES:
        raise ValueError(f"layer_type={c.layer_type!r} is not supported; supported: {LAYER_TYPES}")
    layers.activation(c.hidden_act)  # unknown activations fail here, at build time
    if len(c.hidden_sizes) != len(c.depths):
        raise ValueError(f"hidden_sizes {list(c.hidden_sizes)} and depths {list(c.depths)} differ in length")
    return ResNetModel(
        num_channels=c.num_channels,
        embedding_size=c.embedding_size,
        hidden_sizes=tuple(c.hidden_sizes),
        depths=tuple(c.depths),
        layer_type=c.layer_type,
        act=c.hidden_act,
        downsample_in_first_stage=c.downsample_in_first_stage,
        downsample_in_bottleneck=c.downsample_in_bottleneck,
        freeze_bn_stats=freeze_bn_stats,
        drop_path_rate=layers.check_rate(drop_path_rate, "drop_path_rate"),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def dummy_inputs(hf_config) -> dict:
    """Smallest inputs that build every parameter (for `init` / `jax.eval_shape`)."""
    return {"pixel_values": np.zeros((1, hf_config.num_channels, 32, 32), np.float32)}


def num_layers(hf_config) -> int:
    """Number of stages (the unit of layer-wise LR decay)."""
    return len(hf_config.depths)


def feature_dim(hf_config) -> int:
    return hf_config.hidden_sizes[-1]


def layer_id(path: str, n_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: embedder 0, `stage_s` s+1, above n_layers+1."""
    return layers.layer_id_by_prefix(path, n_layers, ("embedder/",), "stage_")


def block_regex(i: int) -> str:
    """Regex for every parameter of stage i."""
    return rf"^stage_{i}/"


def conv_norm_rules(torch_name: str, flax_name: str) -> list[KeyRule]:
    """HF `ResNetConvLayer`/`ResNetShortCut` (`convolution`, `normalization`) <-> `ConvNorm` (`conv`, `norm`).

    `flax_name` has no collection: the kernel and affine parameters go to "params", running statistics to
    "batch_stats".
    """
    conv, norm = f"{torch_name}.convolution.", f"{torch_name}.normalization."
    return [
        KeyRule(conv + "weight", f"params/{flax_name}/conv/kernel", CONV),
        KeyRule(norm + "weight", f"params/{flax_name}/norm/scale"),
        KeyRule(norm + "bias", f"params/{flax_name}/norm/bias"),
        KeyRule(norm + "running_mean", f"batch_stats/{flax_name}/norm/mean"),
        KeyRule(norm + "running_var", f"batch_stats/{flax_name}/norm/var"),
    ]


def key_map(hf_config) -> KeyMap:
    T, F = "encoder.stages.{s}.layers.{b}.", "stage_{s}/block_{b}/"
    rules = conv_norm_rules("embedder.embedder", "embedder")
    rules += conv_norm_rules(T + "shortcut", F + "shortcut")
    rules += conv_norm_rules(T + "layer.{k}", F + "conv_{k}")
    return KeyMap(rules)


def classifier(hf_config) -> HfClassifier:
    """ResNetForImageClassification: Flatten then a linear layer (`classifier.1`) on the pooled features."""
    rules = tuple(dense_rules("classifier.1", "params/head/out"))
    return HfClassifier("ResNetForImageClassification", "resnet.", "pooler", 0, rules)
