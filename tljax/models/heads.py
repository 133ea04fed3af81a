"""Task heads, kept apart from backbones so a head can be swapped or re-initialised alone.

A `WithHead` model has two parameter subtrees, `backbone/...` and `head/...`; partition rules such as
`("^head/", trainable)` then express a linear probe without knowing the backbone's layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.dropout import Dropout

POOLINGS = ("cls", "mean", "pooler", "spatial_mean")


def pool(outputs: Mapping, how: str, attention_mask=None):
    """Backbone outputs -> (batch, features).

    Args:
      how: "cls" (first token), "mean" (mean over tokens, padding excluded), "pooler" (the family's
        `pooler_output`, e.g. BERT's tanh pooler or ResNet's average pool), "spatial_mean" (NHWC mean),
        or the name of any other output (CLIP's "image_embeds", "text_embeds").
    """
    if how == "cls":
        return outputs["last_hidden_state"][:, 0]
    if how == "mean":
        return mean_pool(outputs["last_hidden_state"], attention_mask)
    if how == "spatial_mean":
        return outputs["last_hidden_state"].mean(axis=(1, 2))
    key = "pooler_output" if how == "pooler" else how
    if key not in outputs:
        raise ValueError(
            f"pooling {how!r} needs output {key!r}, but the backbone returns {sorted(outputs)}; "
            f"choose one of {POOLINGS} or an output name"
        )
    out = outputs[key]
    return out.reshape(out.shape[0], -1)


def mean_pool(hidden, attention_mask=None):
    """Mean over the sequence axis counting only unmasked tokens (sentence-transformers' mean pooling)."""
    if attention_mask is None:
        return hidden.mean(axis=1)
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / jnp.clip(m.sum(axis=1), 1e-9)


class ClassificationHead(nn.Module):
    """dropout -> (optional hidden dense + tanh) -> dense to `num_classes` logits."""

    num_classes: int
    hidden: int = 0
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features, *, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dropout(self.dropout)(features, deterministic=not train)
        if self.hidden:
            x = jnp.tanh(nn.Dense(self.hidden, name="hidden", **kw)(x))
            x = Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros_init(), name="out", **kw)(x)


class MultiHead(nn.Module):
    """Several named heads over the same features (multi-task): returns {task: logits}."""

    heads: dict[str, nn.Module]

    def __call__(self, features, *, train: bool = False):
        return {name: head(features, train=train) for name, head in self.heads.items()}


class WithHead(nn.Module):
    """backbone -> pool -> head. Returns the backbone outputs plus `logits` (a dict for `MultiHead`)."""

    backbone: nn.Module
    head: nn.Module
    pooling: str = "cls"

    def __call__(self, *, train: bool = False, **inputs):
        """Inputs are keyword-only under HF names (`input_ids=`, `attention_mask=`, `pixel_values=`): a mask passed
        by position would otherwise never reach mean pooling."""
        outputs = dict(self.backbone(train=train, **inputs))
        features = pool(outputs, self.pooling, inputs.get("attention_mask"))
        return {**outputs, "features": features, "logits": self.head(features, train=train)}


def head_spec(model) -> dict | None:
    """What `save_pretrained` records about a `WithHead` model's head (config.json `tljax_head`), or None."""
    if not isinstance(model, WithHead):
        return None
    head = model.head
    if type(head) is ClassificationHead:
        return {"kind": "classification", "num_classes": head.num_classes, "hidden": head.hidden,
                "dropout": head.dropout, "pooling": model.pooling}  # fmt: skip
    return {"kind": "custom", "module": type(head).__name__, "pooling": model.pooling}


def check_num_classes(num_classes) -> int:
    """A positive int (not a bool, not a string): a clear error instead of one deep inside Flax."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes
