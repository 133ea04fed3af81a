"""Two-way renaming between PyTorch state-dict keys and flat Flax variable paths, driven by one table.

A family writes its mapping once as `KeyRule`s with `{i}`-style placeholders for layer indices:

    KeyRule("encoder.layer.{i}.attention.self.query.weight", "params/encoder/layer_{i}/attention/query/kernel", LINEAR)

and gets both directions (load and export) from it. Flax paths carry their collection (`params/...`,
`batch_stats/...`) so BatchNorm statistics travel with the weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class Transform:
    """How a tensor's layout differs between PyTorch and Flax (`to_flax` and its inverse `to_torch`)."""

    name: str
    to_flax: callable
    to_torch: callable


SAME = Transform("same", lambda x: x, lambda x: x)
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T)  # torch (out, in) <-> flax (in, out)
CONV = Transform("conv", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))  # OIHW <-> HWIO


class KeyRule(NamedTuple):
    torch: str  # e.g. "encoder.layer.{i}.output.dense.weight"
    flax: str  # e.g. "params/encoder/layer_{i}/mlp/fc2/kernel"
    transform: Transform = SAME


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(body + r"\Z")


class KeyMap:
    """A compiled rule table mapping keys both ways."""

    def __init__(self, rules: Iterable[KeyRule]):
        self.rules = list(rules)
        self._torch = [(_template_regex(r.torch), r) for r in self.rules]
        self._flax = [(_template_regex(r.flax), r) for r in self.rules]

    def to_flax(self, state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Returns (flax-path -> array, and flax-path -> source torch key); keys no rule maps are left out."""
        out, source = {}, {}
        for key, value in state_dict.items():
            hit = _apply(self._torch, key, lambda r: r.flax)
            if hit is not None:
                path, rule = hit
                out[path], source[path] = rule.transform.to_flax(np.asarray(value)), key
        return out, source

    def flax_path(self, key: str) -> str | None:
        """The flax path a torch key maps to (None: no rule maps it)."""
        hit = _apply(self._torch, key, lambda r: r.flax)
        return None if hit is None else hit[0]

    def unmapped(self, keys: Iterable[str]) -> list[str]:
        """Torch keys that no rule maps."""
        return [k for k in keys if self.flax_path(k) is None]

    def to_torch(self, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Flax paths -> torch keys; a path no rule covers is an error (export must not drop weights)."""
        out, missing = {}, []
        for path, value in flat.items():
            hit = _apply(self._flax, path, lambda r: r.torch)
            if hit is None:
                missing.append(path)
                continue
            key, rule = hit
            tensor = rule.transform.to_torch(np.asarray(value))
            out[key] = np.ascontiguousarray(tensor).reshape(np.shape(tensor))  # keeps 0-d tensors 0-d
        if missing:
            raise KeyError(f"no export rule for Flax variables {missing[:10]} ({len(missing)} in all)")
        return out


def _apply(compiled, key, target):
    for regex, rule in compiled:
        m = regex.match(key)
        if m:
            return target(rule).format(**m.groupdict()), rule
    return None


def dense_rules(torch_name: str, flax_name: str, bias: bool = True) -> list[KeyRule]:
    """`nn.Linear` <-> `nn.Dense`: weight/kernel (transposed) and bias."""
    rules = [KeyRule(torch_name + ".weight", flax_name + "/kernel", LINEAR)]
    return rules + ([KeyRule(torch_name + ".bias", flax_name + "/bias")] if bias else [])


def norm_rules(torch_name: str, flax_name: str) -> list[KeyRule]:
    """`nn.LayerNorm` <-> `nn.LayerNorm`: weight/scale and bias."""
    return [KeyRule(torch_name + ".weight", flax_name + "/scale"), KeyRule(torch_name + ".bias", flax_name + "/bias")]


@dataclass(frozen=True)
class HfClassifier:
    """A transformers classification class whose head is one of ours, so heads travel in HF key names both ways.

    Attributes:
      architecture: the class name written to `config.architectures` (e.g. "BertForSequenceClassification").
      prefix: the class's `base_model_prefix` + "." before every backbone key ("bert.").
      pooling: the `WithHead` pooling that feeds HF's classifier the same features.
      hidden: the width of `ClassificationHead.hidden` HF's head has (0: a single linear layer).
      rules: classifier keys <-> `params/head/...` paths.
    """

    architecture: str
    prefix: str
    pooling: str
    hidden: int
    rules: tuple[KeyRule, ...]

    @property
    def key_map(self) -> KeyMap:
        return KeyMap(self.rules)
