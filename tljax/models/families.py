"""Model families by HF `config.model_type`: a plain dict from type to the family's module.

Each family module provides:
  MODEL_TYPES          HF model_type values it handles
  PREFIXES             base-model key prefixes to strip ("bert." of BertForXxx checkpoints)
  IGNORE               regexes over checkpoint keys dropped on purpose (buffers, pretraining heads), reported
  DEFAULT_POOLING      features a head sees by default ("cls", "pooler", ...)
  STEM_REGEX           regex of the parameters below the first block (embeddings / stem), depth 0
  build(hf_config, *, dtype, param_dtype, checkpoint_keys, **options) -> linen module
  dummy_inputs(hf_config) -> kwargs that build every parameter in `init`
  key_map(hf_config) -> KeyMap (torch keys <-> flax paths, both directions)
  feature_dim(hf_config), num_layers(hf_config)
  layer_id(path, n_layers) -> depth for layer-wise LR decay; block_regex(i) -> regex of block i's params
  adapt(converted, shapes, hf_config, prefix) -> {path: note}   optional shape adaptation (pos-emb resampling)
  with_num_layers(hf_config, n) -> config of the first n blocks      optional: load_pretrained(num_layers=n)
"""

from __future__ import annotations

import inspect
from types import ModuleType

import jax.numpy as jnp

from tljax.models import bert, clip, resnet, vit

_MODULES = (
    bert,
    clip,
    vit,
    resnet,
)
FAMILIES: dict[str, ModuleType] = {t: m for m in _MODULES for t in m.MODEL_TYPES}


def family(model_type: str) -> ModuleType:
    """The family module for an HF `model_type`; an unknown type lists the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; tljax supports: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


NOT_OPTIONS = ("hf_config", "dtype", "param_dtype", "checkpoint_keys")  # build's arguments the loaders set


def build(fam: ModuleType, hf_config, dtype, param_dtype, **options):
    """`fam.build` with the dtypes by name ("float32", "bfloat16") and only the options the family has: a typo or
    another family's option (image_size for BERT) is an error listing the ones it takes."""
    unknown = sorted(set(options) - set(inspect.signature(fam.build).parameters) - set(NOT_OPTIONS))
    if unknown:
        known = [p for p in inspect.signature(fam.build).parameters if p not in NOT_OPTIONS]
        raise ValueError(f"{hf_config.model_type} models take no option {unknown}; their options: {known}")
    try:
        dtypes = {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(param_dtype or dtype)}
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r} / param_dtype {param_dtype!r}: {e}; use 'float32' or 'bfloat16'") from e
    return fam.build(hf_config, **dtypes, **options), dtypes
