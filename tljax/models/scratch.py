"""Models trained from scratch: a family's linen module built from an HF config, with freshly initialised weights.

    loaded = tm.from_config({"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
                             "depths": [1, 1, 1, 1], "layer_type": "basic"}, num_classes=5, seed=0)

The pre-training side of transfer experiments (Yosinski et al. 2014: train on classes A, transfer blocks to B) and
random-init baselines. The result is a `Pretrained` like `load_pretrained`'s, so everything downstream (partitions,
schedules, `save_pretrained`, then `load_pretrained(..., reinit=...)` of the export) is the same. Initialisers are the
modules' own (flax defaults: LeCun-normal kernels, zero biases, unit norms), not the HF models' `_init_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tljax import tree
from tljax.models import families, head_io
from tljax.models.heads import WithHead
from tljax.models.pretrained import LoadReport, Pretrained


def hf_config_of(config: Any):
    """A transformers config from a config object, or a dict with `model_type` and the config's fields."""
    if isinstance(config, Mapping):
        from transformers import AutoConfig

        config = dict(config)
        model_type = config.pop("model_type", None)
        if not model_type:
            raise ValueError(
                f"a model config dict needs 'model_type' (one of {sorted(families.FAMILIES)}); "
                f"got keys {sorted(config)}"
            )
        families.family(model_type)  # unsupported families fail here, naming the supported ones
        return AutoConfig.for_model(model_type, **config)
    if not hasattr(config, "model_type"):
        raise TypeError(f"expected a transformers config or a dict with 'model_type', got {type(config).__name__}")
    return config


def from_config(
    config: Any,
    *,
    num_classes: int | None = None,
    head=None,
    pooling: str | None = None,
    dtype: str | jnp.dtype = "float32",
    param_dtype: str | jnp.dtype | None = None,
    seed: int = 0,
    **family_options,
) -> Pretrained:
    """A randomly initialised model of a supported family (arguments as `load_pretrained`'s; `seed` draws the
    weights). The report lists every parameter as re-initialised."""
    hf_config = hf_config_of(config)
    fam = families.family(hf_config.model_type)
    backbone, dtypes = families.build(fam, hf_config, dtype, param_dtype, **family_options)
    head, pooling = head_io.requested(head, num_classes, pooling, None, fam, True, **dtypes)
    model = WithHead(backbone, head, pooling) if head is not None else backbone
    variables = jax.jit(lambda key: model.init({"params": key}, **fam.dummy_inputs(hf_config)))(jax.random.key(seed))
    variables = dict(variables)
    params = variables.pop("params")
    paths = sorted(tree.flatten({"params": params, **variables}))  # load_pretrained's report names
    report = LoadReport(f"random init (seed {seed})", hf_config.model_type, reinitialized=paths)
    report.num_params = tree.count(params)
    return Pretrained(model, params, variables, report, hf_config, fam)
