"""A domain classifier head beside a `WithHead` model's task head, and schedules that train it.

    loaded = with_domain_head(loaded, DomainClassifier(hidden=(1024, 1024)), example_batch)
    schedule = train_domain_head(freezing.get("full", loaded, steps=300), loaded)

The wrapped model returns what `WithHead` returns (backbone outputs, pooled `features`, `logits`) plus
`domain_logits` (B,): the domain head reads the features through the gradient reversal layer, with the batch's
`grl_coeff`. Its parameters live under `domain_head/`, beside `backbone/` and `head/`, so rule sets and freezing
schedules written for the plain model still apply to the backbone; `train_domain_head` prepends one rule that
keeps the domain head trainable in every phase.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax import freezing
from tljax.losses import model_inputs
from tljax.models.dropout import Dropout
from tljax.models.heads import WithHead
from tljax.partition import TRAIN

from .losses import gradient_reversal

DOMAIN_HEAD = r"^domain_head/"


class DomainClassifier(nn.Module):
    """MLP features -> one domain logit: (Dense -> ReLU -> dropout) per hidden width, then Dense(1).

    DANN (Ganin et al. 2016) used 1024-1024 with dropout 0.5 on deep features; smaller works for small features."""

    hidden: Sequence[int] = (1024, 1024)
    dropout: float = 0.5

    @nn.compact
    def __call__(self, features, *, train: bool = False):
        x = features
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
            x = Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dense(1, name="out")(x)[..., 0]


class WithDomainHead(WithHead):
    """`WithHead` plus an optional `domain_head` on the reversed pooled features.

    The adaptation batch keys `domain` and `grl_coeff` arrive as keyword inputs (they are not in
    `losses.NOT_INPUTS`); they are taken here and never reach the backbone. Without `grl_coeff` (evaluation) the
    coefficient is 0: the forward pass is the same, only training needs the reversed gradient."""

    domain_head: nn.Module | None = None

    def __call__(self, *, train: bool = False, domain=None, grl_coeff=None, **inputs):
        out = super().__call__(train=train, **inputs)
        if self.domain_head is None:
            return out
        reversed_features = gradient_reversal(out["features"], 0.0 if grl_coeff is None else grl_coeff)
        return {**out, "domain_logits": self.domain_head(reversed_features, train=train)}


def with_domain_head(loaded, domain_head: nn.Module | None, batch: Mapping, seed: int = 0):
    """`loaded` (a `Pretrained` whose model is a `WithHead`) with its model wrapped in `WithDomainHead` and, when
    `domain_head` is given, fresh parameters under `domain_head/` (initialised from `seed`). `batch`: one batch (or
    its shapes) of model inputs, to size the head from the pooled features. Backbone and task head are unchanged."""
    model = loaded.model
    if not isinstance(model, WithHead):
        raise ValueError(
            f"with_domain_head needs a model with a task head (WithHead), got {type(model).__name__}: load it with "
            "num_classes=... or head=..."
        )
    if "domain_head" in loaded.params:
        raise ValueError("the model already has domain_head parameters; wrap the plain model")
    wrapped = WithDomainHead(model.backbone, model.head, model.pooling, domain_head)
    if domain_head is None:
        return dataclasses.replace(loaded, model=wrapped)
    inputs = {k: v for k, v in model_inputs(batch).items() if k not in ("domain", "grl_coeff")}
    shapes = jax.eval_shape(lambda v, b: model.apply(v, **b), loaded.variables, inputs)  # traced, not computed
    width = shapes["features"].shape[-1]
    params = domain_head.init(jax.random.key(seed), jnp.zeros((1, width), jnp.float32))["params"]
    return dataclasses.replace(loaded, model=wrapped, params={**loaded.params, "domain_head": params})


def train_domain_head(schedule: freezing.FreezingSchedule, loaded) -> freezing.FreezingSchedule:
    """`schedule` with `("^domain_head/", TRAIN)` first in every phase's rules (at the phase's learning rate); the
    rest of each phase's rules is resolved for `loaded` as before. Unchanged when the model has no domain head."""
    if "domain_head" not in loaded.params:
        return schedule
    phases = tuple(
        dataclasses.replace(p, rules=((DOMAIN_HEAD, TRAIN), *p.resolve_rules(loaded)), rule_args={})
        for p in schedule.phases
    )
    return freezing.FreezingSchedule(phases, schedule.name)
