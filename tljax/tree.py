"""Pytree helpers over `/`-joined parameter paths, the names every rule in tljax matches against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

SEP = "/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> `{"a/b/kernel": leaf}`; empty sub-dicts are dropped."""
    return traverse_util.flatten_dict(dict(tree), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def path_str(key_path: tuple) -> str:
    """A `jax.tree_util` key path -> `"a/b/kernel"`."""
    return jax.tree_util.keystr(key_path, simple=True, separator=SEP)


def map_with_path(fn, tree):
    """`jax.tree.map` whose function also receives the leaf's `/`-joined path: `fn(path, leaf)`."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree)


def paths(tree) -> list[str]:
    """All leaf paths of `tree`, in tree order."""
    return [path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]


def count(tree) -> int:
    """Number of scalars in all leaves."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def nbytes(tree) -> int:
    """Bytes of all leaves (arrays or `jax.ShapeDtypeStruct`s)."""
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
