"""PEFT as a functional transformation of a loaded model: `apply(loaded, methods)` wraps the backbone in `Peft`,
which runs it unchanged except that Flax method interception lets each method add its parameters inside the layers it
targets (LoRA factors beside a Dense kernel, adapter bottlenecks after a Dense, soft prompts in the word embedding).

No family is forked: the wrapper shares the backbone's scope, so every existing path stays where it was
(`backbone/encoder/layer_3/attention/query/kernel`) and the new leaves sit beside them
(`.../attention/query/lora_a`). Partitions, freezing schedules, the frozen-prefix cache and checkpoints see an
ordinary parameter tree; `rules.peft` trains the new leaves (and the head) and freezes the rest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import numpy as np

from tljax import tree
from tljax.models.heads import WithHead


@dataclasses.dataclass(frozen=True)
class Method:
    """A PEFT method: which layers it targets (regexes over parameter paths) and what it adds there.

    PEFT methods adapt the backbone: targets are searched among the backbone's parameters only (`backbone/...` of a
    model with a head). A regex that also matches the head (r"out/kernel$" matches `head/out/kernel` too) adapts its
    backbone matches and leaves the head as it is (the rule set trains the head in full); a regex that matches only
    outside the backbone is an error.

    Subclasses set `KIND` (the config name), `PARAMS` (the names of the leaves they add) and override the hooks they
    need; `modules` is filled in by `apply` (the module paths the targets resolved to) and never set by hand.
    """

    KIND: ClassVar[str] = ""
    PARAMS: ClassVar[tuple[str, ...]] = ()
    MERGEABLE: ClassVar[bool] = False
    modules: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def resolve(self, shapes: Mapping[str, Any], family) -> frozenset:
        """The backbone module paths this method wraps, from the flat parameter shapes `{path: shape}` of the whole
        model (`split_backbone` separates the backbone's)."""
        raise NotImplementedError

    def dense(self, module: nn.Dense, x, y, train: bool):
        """Output of a targeted `nn.Dense` (input `x`, base output `y`)."""
        return y

    def embed(self, module: nn.Embed, ids, y):
        """Output of a targeted `nn.Embed` (token ids `ids`, base output `y`)."""
        return y

    def inputs(self, inputs: dict) -> dict:
        """Model inputs before the backbone runs (prompt tuning inserts placeholder positions)."""
        return inputs

    def outputs(self, outputs: dict) -> dict:
        """Backbone outputs after it ran (prompt tuning removes the prompt positions)."""
        return outputs

    def initialise(self, new: dict, base: Mapping, key) -> dict:
        """Values of this method's new leaves `{path: array}` from the base parameters (default: the module init)."""
        return new

    def to_config(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "modules"}
        return {"method": self.KIND, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


BACKBONE = "backbone/"  # where a model with a head (`tljax.models.heads.WithHead`) keeps its backbone


def split_backbone(shapes: Mapping[str, Any]) -> tuple[dict, dict]:
    """(the backbone's entries, the others): a model with a head keeps its backbone under `backbone/` and the rest
    (`head/...`) outside it; a plain backbone is all backbone."""
    if not any(p.startswith(BACKBONE) for p in shapes):
        return dict(shapes), {}
    inside = {p: s for p, s in shapes.items() if p.startswith(BACKBONE)}
    return inside, {p: s for p, s in shapes.items() if p not in inside}


def _kernels(shapes: Mapping[str, Any]) -> dict:
    return {p[: -len("/kernel")]: s for p, s in shapes.items() if p.endswith("/kernel")}


def match_kernels(targets: Sequence[str], shapes: Mapping[str, Any], what: str, ndim: int = 2) -> frozenset:
    """Backbone module paths whose `kernel` (of rank `ndim`) some target regex matches; every regex must match one.

    Kernels outside the backbone (the head) are never targets: a regex matching some of them besides backbone
    kernels adapts the backbone ones only; one matching only them is an error that names them.
    """
    inside, outside = split_backbone(shapes)
    kernels, others = _kernels(inside), _kernels(outside)
    out = set()
    for t in targets:
        try:
            rx = re.compile(t)
        except re.error as e:
            raise ValueError(f"{what}: invalid target regex {t!r}: {e}") from e
        hits = [m for m in kernels if rx.search(m + "/kernel")]
        elsewhere = sorted(m + "/kernel" for m in others if rx.search(m + "/kernel"))
        if not hits and elsewhere:
            raise ValueError(
                f"{what}: target {t!r} matches only {elsewhere} outside the backbone; PEFT methods adapt the "
                "backbone, and the head trains in full under the rule set (rules.peft trains it): target backbone "
                "layers, or train the head alone with the rule set 'linear_probe'"
            )
        if not hits:
            examples = [m + "/kernel" for m in list(kernels)[:3]]
            raise ValueError(f"{what}: target {t!r} matches no kernel of this model (examples: {examples})")
        wrong = [m for m in hits if len(kernels[m]) != ndim]
        if wrong:
            raise ValueError(
                f"{what} targets rank-{ndim} Dense kernels, but {t!r} matches {wrong[0]}/kernel of shape "
                f"{tuple(kernels[wrong[0]])}; narrow the regex (e.g. add '/kernel$' to a Dense path)"
            )
        out.update(hits)
    return frozenset(out)


class Peft(nn.Module):
    """The backbone with PEFT methods woven in. Same inputs, outputs and parameter paths as `inner`, plus the
    methods' leaves; `train=True` enables their dropout."""

    inner: nn.Module
    methods: tuple[Method, ...]

    def setup(self):
        nn.share_scope(self, self.inner)  # the backbone's parameters keep their paths

    def __call__(self, *, train: bool = False, **inputs):
        for m in self.methods:
            inputs = m.inputs(dict(inputs))

        def intercept(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.Embed):
                return next_fun(*args, **kwargs)
            path = "/".join(module.path)
            mine = [m for m in self.methods if path in m.modules]
            if not mine:
                return next_fun(*args, **kwargs)
            y = next_fun(*args, **kwargs)
            for m in mine:
                y = m.dense(module, args[0], y, train) if isinstance(module, nn.Dense) else m.embed(module, args[0], y)
            return y

        with nn.intercept_methods(intercept):
            out = self.inner(train=train, **inputs)
        for m in reversed(self.methods):
            out = m.outputs(dict(out))
        return out


# ---- the loaded model ----------------------------------------------------------------------------------------------


def backbone(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, WithHead) else model


def with_backbone(model: nn.Module, new: nn.Module) -> nn.Module:
    return model.clone(backbone=new) if isinstance(model, WithHead) else new


def methods_of(loaded) -> tuple[Method, ...]:
    """The PEFT methods woven into a loaded model (empty for a plain one)."""
    b = backbone(loaded.model)
    return b.methods if isinstance(b, Peft) else ()


def added_paths(loaded) -> list[str]:
    """Parameter paths the PEFT methods added (`backbone/.../lora_a`, ...)."""
    names = {n for m in methods_of(loaded) for n in m.PARAMS}
    return [p for p in tree.paths(loaded.params) if p.rsplit("/", 1)[-1] in names]


def param_regex(loaded) -> str:
    """A regex matching exactly the leaves the model's PEFT methods added (for partition rules)."""
    names = sorted({n for m in methods_of(loaded) for n in m.PARAMS})
    if not names:
        raise ValueError(
            "this model has no PEFT parameters: wrap it first with tljax.peft.apply(loaded, [peft.LoRA(...)]) "
            "(job config: model.peft)"
        )
    return "/(" + "|".join(re.escape(n) for n in names) + ")$"


def apply(loaded, methods: Sequence[Method], seed: int = 0):
    """`loaded` (a `Pretrained`) with `methods` woven into its backbone and their parameters initialised.

    The result is again a `Pretrained`: `.params` holds the base parameters unchanged plus the new leaves, `.model`
    computes the base model's outputs at initialisation (LoRA's B and the adapters' up-projections start at zero).
    Train the new leaves with `rules.peft(result)` (head included); `merge` folds LoRA back for export.
    """
    methods = tuple(methods)
    if not methods:
        raise ValueError("apply needs at least one PEFT method, e.g. [tljax.peft.LoRA(rank=8)]")
    if methods_of(loaded):
        raise ValueError("this model already has PEFT methods; apply all of them in one call")
    kinds = [m.KIND for m in methods]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"each PEFT method may appear once, got {kinds}")
    shapes = {p: np.shape(v) for p, v in tree.flatten(loaded.params).items()}
    methods = tuple(dataclasses.replace(m, modules=m.resolve(shapes, loaded.family)) for m in methods)
    model = with_backbone(loaded.model, Peft(backbone(loaded.model), methods))
    from tljax.models.pretrained import init_only

    dummy = loaded.family.dummy_inputs(loaded.hf_config)
    base = tree.flatten(loaded.params)
    woven = tree.flatten(jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy)["params"]))
    added = [f"params/{p}" for p in sorted(set(woven) - set(base))]
    fresh = init_only(model, dummy, {"params": jax.random.key(seed)}, added)
    new = {p.removeprefix("params/"): v for p, v in fresh.items()}
    key = jax.random.key(seed + 1)
    for i, m in enumerate(methods):
        mine = {p: v for p, v in new.items() if p.rsplit("/", 1)[-1] in m.PARAMS}
        new.update(m.initialise(mine, base, jax.random.fold_in(key, i)))
    params = tree.unflatten({**base, **new})
    return dataclasses.replace(loaded, model=model, params=params)


def trainable_count(loaded) -> int:
    """Number of scalars the PEFT methods added."""
    flat = tree.flatten(loaded.params)
    return tree.count({p: flat[p] for p in added_paths(loaded)})
