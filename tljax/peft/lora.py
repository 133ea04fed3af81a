"""LoRA (Hu et al., 2021): `y = x W + (alpha / r) * dropout(x) A B` on the targeted Dense kernels, with A (d_in, r)
random and B (r, d_out) zero, so the model is unchanged at initialisation and each kernel gains r * (d_in + d_out)
trainable parameters. `merge` folds `(alpha / r) A B` into W for an ordinary checkpoint."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.dropout import bernoulli
from tljax.models.products import affine
from tljax.peft.core import Method, match_kernels

# the original paper's choice: the query and value projections of every attention block
DEFAULT_TARGETS = (r"attention/(query|value)/kernel$",)


def _check_targets(self) -> None:
    if isinstance(self.targets, str):
        t = self.targets
        raise TypeError(f"targets takes a list of regexes, got the string {t!r}; wrap it: [{t!r}]")
    object.__setattr__(self, "targets", tuple(self.targets))
    if not self.targets:
        raise ValueError(f"{type(self).__name__} needs at least one target regex")


def dropout(module: nn.Module, x, rate: float, train: bool):
    """Inverted dropout drawn from the module's 'dropout' stream (a method hook cannot create an `nn.Dropout`)."""
    if not train or rate == 0.0:
        return x
    keep = bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """Low-rank updates of the backbone kernels that `targets` (regexes over parameter paths such as
    `backbone/encoder/layer_0/attention/query/kernel`) select. A target also matching the head (r"out/kernel$" and
    `head/out/kernel`) adapts only its backbone matches; one matching only the head is an error.

    Args:
      rank: r. alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `rslora`, Kalajdzievski 2023).
      dropout: on the LoRA branch's input, in training.
    """

    KIND = "lora"
    PARAMS = ("lora_a", "lora_b")
    MERGEABLE = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        _check_targets(self)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def resolve(self, shapes, family) -> frozenset:
        modules = match_kernels(self.targets, shapes, "LoRA")
        small = [m for m in modules if min(shapes[m + "/kernel"]) < self.rank]
        if small:
            shape = tuple(shapes[small[0] + "/kernel"])
            raise ValueError(
                f"LoRA rank {self.rank} exceeds a dimension of {small[0]}/kernel {shape}: choose rank <= {min(shape)}"
            )
        return modules

    def dense(self, module, x, y, train):
        d_in = x.shape[-1]
        bound = 1.0 / math.sqrt(d_in)  # PEFT's default: kaiming-uniform(a=sqrt(5)) of A = U(-1/sqrt(d_in), ...)
        uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        a = module.param("lora_a", uniform, (d_in, self.rank), module.param_dtype)
        b = module.param("lora_b", nn.initializers.zeros_init(), (self.rank, module.features), module.param_dtype)
        dtype = module.dtype or y.dtype
        h = dropout(module, x, self.dropout, train).astype(dtype)
        return y + affine(affine(h, a.astype(dtype)), b.astype(dtype)) * jnp.asarray(self.scale, dtype)

    def merge(self, flat: Mapping) -> dict:
        """`flat` parameters with `scale * A B` added to each targeted kernel and the factors removed."""
        out = dict(flat)
        missing = sorted(m for m in self.modules if f"{m}/lora_a" not in out or f"{m}/lora_b" not in out)
        if missing:
            raise ValueError(
                f"merge: the parameters hold no LoRA factors for {missing[:3]}: pass the parameters of the model "
                "that peft.apply returned (e.g. the trained state's params), not the base model's"
            )
        for m in self.modules:
            a, b = out.pop(f"{m}/lora_a"), out.pop(f"{m}/lora_b")
            k = out[f"{m}/kernel"]
            delta = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32) * self.scale
            out[f"{m}/kernel"] = (jnp.asarray(k, jnp.float32) + delta).astype(k.dtype)
        return out
