"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): `y + up(act(down(y)))` after the targeted
Dense layers, before their residual connection. `up` starts at zero, so an adapter is the identity at
initialisation; each targeted layer of width d gains 2 d m + m + d parameters for bottleneck width m."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from tljax.models.layers import activation
from tljax.models.products import affine
from tljax.peft.core import Method, match_kernels
from tljax.peft.lora import _check_targets

# the shared transformer block (tljax.models.layers.Block): attention output projection and the MLP's fc2
STYLES = {
    "houlsby": (r"attention/out/kernel$", r"mlp/fc2/kernel$"),  # after attention and after the MLP
    "pfeiffer": (r"mlp/fc2/kernel$",),  # after the MLP only
}


@dataclasses.dataclass(frozen=True)
class Adapter(Method):
    """A bottleneck of width `size` after each backbone Dense that `targets` selects (default: the `style`'s
    placement); a target matching only the head is an error, one matching the head too adapts the backbone only.

    Args:
      size: bottleneck width m. style: "houlsby" (after attention and MLP) or "pfeiffer" (after the MLP).
      act: the bottleneck's activation (a name of `tljax.models.layers.activation`).
      init_std: normal init of the down-projection (the up-projection starts at zero).
    """

    KIND = "adapter"
    PARAMS = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")
    size: int = 64
    style: str = "houlsby"
    act: str = "gelu"
    targets: tuple[str, ...] = ()
    init_std: float = 1e-2

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"adapter size must be a positive int, got {self.size!r}")
        if self.style not in STYLES:
            raise ValueError(f"adapter style must be one of {sorted(STYLES)}, got {self.style!r}")
        activation(self.act)  # an unknown name fails here, not at trace time
        if not self.targets:
            object.__setattr__(self, "targets", STYLES[self.style])
        _check_targets(self)

    def resolve(self, shapes, family) -> frozenset:
        return match_kernels(self.targets, shapes, "Adapter")

    def dense(self, module, x, y, train):
        d = y.shape[-1]
        dtype, pdtype = module.dtype or y.dtype, module.param_dtype
        down = module.param("adapter_down", nn.initializers.normal(self.init_std), (d, self.size), pdtype)
        down_b = module.param("adapter_down_bias", nn.initializers.zeros_init(), (self.size,), pdtype)
        up = module.param("adapter_up", nn.initializers.zeros_init(), (self.size, d), pdtype)
        up_b = module.param("adapter_up_bias", nn.initializers.zeros_init(), (d,), pdtype)
        h = activation(self.act)(affine(y.astype(dtype), down.astype(dtype), down_b.astype(dtype)))
        return y + affine(h, up.astype(dtype), up_b.astype(dtype))
