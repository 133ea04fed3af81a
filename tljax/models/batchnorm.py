"""BatchNorm with torch's statistics rule, and inference mode for the BatchNorm layers a phase keeps frozen.

Keras runs the BatchNorm of a non-trainable layer in inference mode (timm: `freeze_batch_norm_2d`): it normalises
with the running statistics and leaves them alone. `running_average(paths)` does that per layer while a model is
applied: every BatchNorm whose module path is in `paths` uses and keeps its statistics, the others follow `train`.
The training step passes the layers whose scale and bias the current phase freezes, so a linear probe or a top-k
fine-tune never drifts the statistics of the frozen base, and a layer thawed later starts from the pretrained ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """torch's `BatchNorm2d` over the channel (last) axis: `scale`/`bias` params, `mean`/`var` batch_stats.

    Normalises with the biased batch variance and folds the *unbiased* one (x n/(n-1), n = B*H*W) into `var`, as
    torch does (flax's `nn.BatchNorm` folds the biased one, so fine-tuned statistics would drift from a PyTorch
    baseline). `momentum` 0.9 here is torch's momentum 0.1.
    """

    use_running_average: bool
    momentum: float = 0.9  # weight of the old running statistic (torch momentum 0.1)
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        """`use_running_average` overrides the attribute for this call (set by `running_average`)."""
        running = self.use_running_average if use_running_average is None else use_running_average
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if running:
            mean, var = running_mean.value, running_var.value
        else:
            mean, var = _moments(x)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * var * (n / max(n - 1, 1))
        y = (x.astype(jnp.float32) - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)


def _moments(x):
    """Per-channel mean and biased variance in fp32, as E[(x - mean)^2] (torch's, no E[x^2] - mean^2 cancellation)."""
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    return mean, jnp.square(x - mean).mean(axes)


@contextlib.contextmanager
def running_average(paths: Collection[str]) -> Iterator[None]:
    """Within this context, BatchNorm layers (ours and flax's) at these `/`-joined module paths run in inference mode.

    Paths are those of the module in the applied model, e.g. `backbone/stage_0/block_0/conv_0/norm`. Takes effect
    while a model is traced, so use it around `model.apply` inside the jitted function.
    """
    paths = frozenset(paths)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (
            paths
            and context.method_name == "__call__"
            and isinstance(module, BatchNorm | nn.BatchNorm)
            and "/".join(module.path) in paths
        ):
            kwargs = {**kwargs, "use_running_average": True}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
        yield


def frozen_modules(trainable: dict[str, bool]) -> frozenset[str]:
    """Module paths all of whose parameters are frozen, from `{param path: trainable}` (e.g. `.../norm` when its
    scale and bias are frozen): the layers `running_average` should put in inference mode."""
    modules: dict[str, bool] = {}
    for path, train in trainable.items():
        module = path.rpartition("/")[0]
        modules[module] = modules.get(module, False) or bool(train)
    return frozenset(m for m, any_trainable in modules.items() if not any_trainable)
