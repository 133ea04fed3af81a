"""Regularisers toward the starting (pretrained) model: L2-SP on the weights, DELTA on the feature maps.

    reg = regularizers.l2_sp(loaded, alpha=0.01, beta=0.01)   # or from_config(loaded, {"name": "l2_sp", ...})
    part = partition.build(loaded.params, rules.full(loaded), learning_rate=1e-4, weight_decay=0.0)
    step = jax.jit(make_train_step(loaded.model, part, regularizer=reg), donate_argnums=0)
    w0 = jax.tree.map(jnp.copy, regularizers.anchor(reg, loaded.params, loaded.state))
    state = init_state(loaded.params, part.tx, loaded.state, anchor=w0)

or `EngineConfig(regularizer={"name": "l2_sp", "alpha": 0.01, "beta": 0.01})`. The step minimises task loss plus
penalty and reports the penalty as `reg_loss`; `loss` stays the task loss, so curves with and without a regulariser
compare. The anchor w0 is `TrainState.anchor`: an input of the jitted step placed like the params (a 22M-parameter
copy must not be baked into the program as a constant), holding only the parameters some phase trains (frozen ones
still equal w0). `engine.fit` does not checkpoint it: every run starts from `loaded.params`, so a resumed run
rebuilds it from there.

- L2-SP (Li, Grandvalet & Davoine, 2018): alpha/2 ||w - w0||^2 on the transferred weights, beta/2 ||w||^2 on the
  new ones (the head), per group from an ordered `(regex, strength)` list as partitions read them. Train with
  weight_decay=0: decoupled weight decay pulls toward zero, not toward w0. The penalty enters the loss (as in the
  paper's SGD), so Adam rescales its gradient like the task's.
- DELTA (Li et al., 2019): alpha times the distance between the fine-tuned and the starting model's block outputs
  on the same batch (`feature_distance`), optionally channel-weighted (`channel_attention`). The starting model runs
  in inference mode under `stop_gradient`: one extra forward pass per step, up to the highest compared block.

A regulariser is plain data resolved against one model (`L2SP`, `Delta`) with what the step asks of it:
`capture()` (a context around the fine-tuned forward pass that records what `penalty` compares), `reference(model,
frozen, anchor, batch)` (computed outside the differentiated function: DELTA's starting-model features) and
`penalty(trainable, anchor, seen, reference, batch)`; `anchored(path)` says which starting values it reads.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax import features, prefix_cache, tree
from tljax.losses import classification_loss, model_inputs
from tljax.partition import assign, check_number, compile_regex
from tljax.rules import HEAD, at_backbone

TOWARD_START, TOWARD_ZERO = "alpha", "beta"  # an L2-SP strength's key says where it pulls: w0, or zero


# --- L2-SP ---


@dataclass(frozen=True)
class L2SP:
    """L2-SP resolved over a model's parameters.

    Attributes:
      strengths: path -> (kind, strength): kind "alpha" pulls toward the starting value, "beta" toward zero;
        paths with no penalty (or strength 0) are absent, so they cost nothing.
    """

    strengths: Mapping[str, tuple[str, float]]
    name: ClassVar[str] = "l2_sp"
    needs_full_forward: ClassVar[bool] = False

    def anchored(self, path: str) -> bool:
        """Whether the penalty reads the starting value of this parameter."""
        return self.strengths.get(path, ("", 0.0))[0] == TOWARD_START

    def capture(self):
        return contextlib.nullcontext({})

    def reference(self, model, frozen, anchor, batch) -> None:
        return None

    def penalty(self, trainable, anchor, seen, reference, batch) -> jax.Array:
        return l2_sp_penalty(self.strengths, trainable, anchor["params"])


def l2_sp(loaded, alpha: float | None = None, beta: float | None = None, rules: Sequence | None = None) -> L2SP:
    """L2-SP over `loaded.params`.

    Args:
      alpha: strength toward the starting values of everything outside `head/` (the transferred weights); 0.01
        when neither it nor `rules` is given.
      beta: strength toward zero of the new parameters: the head (`head/`, when the model has one) and the leaves
        `tljax.peft` added; 0.01 likewise.
      rules: instead of alpha and beta, an ordered `(regex, strength)` list over `/`-joined parameter paths, first
        match wins, every parameter covered, every regex used (as `partition.build` reads rules); a strength is
        `{"alpha": a}` (toward w0), `{"beta": b}` (toward zero) or None (no penalty). E.g. a stronger pull on the
        bottom block: `[("^head/", {"beta": 0.01}), ("layer_0/", {"alpha": 0.1}), (".*", {"alpha": 0.01})]`.
    """
    paths = tree.paths(loaded.params)
    if rules is None:
        alpha = check_number("l2_sp alpha", 0.01 if alpha is None else alpha)
        beta = check_number("l2_sp beta", 0.01 if beta is None else beta)
        head = any(compile_regex(HEAD, "l2_sp").search(p) for p in paths)
        new = ([(HEAD, {TOWARD_ZERO: beta})] if head else []) + _peft_leaves(loaded, beta)
        rules = new + [(".*", {TOWARD_START: alpha})]
    elif alpha is not None or beta is not None:
        raise ValueError("l2_sp takes alpha and beta (the default groups) or rules (strengths per group), not both")
    specs = [_strength(rule, f"l2_sp rule {i}") for i, rule in enumerate(rules)]
    try:
        owner = assign(paths, rules)
    except ValueError as e:
        raise ValueError(f"l2_sp rules: {e} (an l2_sp rule's value is {{'alpha': a}}, {{'beta': b}} or None)") from e
    return L2SP({p: specs[o] for p, o in zip(paths, owner, strict=True) if specs[o] is not None})


def _strength(rule, where: str) -> tuple[str, float] | None:
    """A `(regex, {"alpha": a} | {"beta": b} | None)` rule's (kind, strength), None for no penalty."""
    if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
        raise ValueError(f"{where}: a rule is a (regex, strength) pair, got {rule!r}")
    compile_regex(rule[0], where)
    spec = rule[1]
    if spec is None:
        return None
    if not (isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in (TOWARD_START, TOWARD_ZERO)):
        raise ValueError(f"{where}: a strength is {{'alpha': a}} (toward w0), {{'beta': b}} or None, got {spec!r}")
    kind, value = next(iter(spec.items()))
    value = check_number(f"{where} {kind}", value)
    return (kind, value) if value else None


def _peft_leaves(loaded, beta: float) -> list:
    """The leaves `tljax.peft` added (LoRA factors, adapters, prompts) are new: pulled toward zero like the head."""
    from tljax import peft

    return [(peft.param_regex(loaded), {TOWARD_ZERO: beta})] if peft.methods_of(loaded) else []


def l2_sp_penalty(strengths: Mapping[str, tuple[str, float]], trainable, start: Mapping[str, Any]) -> jax.Array:
    """Sum over the trainable leaves (None elsewhere) with a strength s of s/2 ||w - target||^2 in float32; target
    is the starting value (`start[path]`) for kind "alpha", zero for "beta". Frozen leaves cost nothing."""
    total = jnp.zeros((), jnp.float32)
    for path, w in tree.flatten(trainable).items():
        if w is None or path not in strengths:
            continue
        kind, s = strengths[path]
        diff = w.astype(jnp.float32)
        if kind == TOWARD_START:
            if path not in start:
                raise ValueError(
                    f"the anchor holds no starting value of {path!r}, which trains: build it with "
                    "regularizers.anchor(reg, params, trainable=...) over every parameter some phase trains"
                )
            diff = diff - start[path].astype(jnp.float32)
        total = total + 0.5 * s * jnp.sum(jnp.square(diff))
    return total


# --- DELTA ---


@dataclass(frozen=True)
class Delta:
    """DELTA resolved for a model. BatchNorm layers that train use batch statistics in the fine-tuned pass but running
    statistics in the starting model's, so with them the term is not zero at the start.

    Attributes:
      alpha: strength.
      blocks: full-model regexes of the modules whose outputs are compared (`features.is_block`).
      channel_weights: per block, one weight per channel (mean 1, `channel_attention`), or None (all 1).
    """

    alpha: float
    blocks: tuple[str, ...]
    channel_weights: tuple[tuple[float, ...], ...] | None = None
    name: ClassVar[str] = "delta"
    needs_full_forward: ClassVar[bool] = True  # the compared blocks must run: no frozen-prefix cache

    def anchored(self, path: str) -> bool:
        return True  # the starting model runs whole

    def capture(self):
        return captured_outputs(self.blocks)

    def reference(self, model, frozen, anchor, batch) -> tuple[jax.Array, ...]:
        """The starting model's block outputs on `batch`: inference mode, no gradient."""
        flat = tree.flatten(frozen)
        missing = [p for p, v in flat.items() if v is None and p not in anchor["params"]]
        if missing:
            raise ValueError(f"the anchor holds no starting value of {len(missing)} trained parameters: {missing[:4]}")
        params = tree.unflatten({p: anchor["params"].get(p, v) for p, v in flat.items()})
        with captured_outputs(self.blocks) as seen:
            model.apply({"params": params, **anchor["collections"]}, **model_inputs(batch), train=False)
        return jax.lax.stop_gradient(_in_order(seen, self.blocks))

    def penalty(self, trainable, anchor, seen, reference, batch) -> jax.Array:
        weights = self.channel_weights or (None,) * len(self.blocks)
        mask = batch.get("attention_mask")
        pairs = zip(_in_order(seen, self.blocks), reference, weights, strict=True)
        return self.alpha * sum(feature_distance(f, f0, w, mask) for f, f0, w in pairs)


def delta(loaded, alpha: float = 0.01, layers: Sequence[int] | None = None, channel_weights=None) -> Delta:
    """DELTA comparing the outputs of backbone blocks `layers` (indices as `features.extract` takes them, negative
    from the top; None: every block) between the fine-tuned and the starting model.

    Args:
      channel_weights: per compared block, a sequence of one weight per channel (`channel_attention`), or None.
    """
    alpha = check_number("delta alpha", alpha)
    every = range(features.num_blocks(loaded))
    indices = list(every) if layers is None else [features.resolve_layer(loaded, i) for i in layers]
    if not indices or len(set(indices)) != len(indices):
        raise ValueError(f"delta layers must name at least one block, each once, got {layers!r}")
    blocks = tuple(at_backbone(loaded, loaded.family.block_regex(i)) for i in indices)
    return Delta(alpha, blocks, _channel_weights(channel_weights, len(blocks)))


def _channel_weights(weights, n: int) -> tuple[tuple[float, ...], ...] | None:
    if weights is None:
        return None
    if len(weights) != n:
        raise ValueError(f"delta channel_weights has {len(weights)} entries for {n} compared blocks: one per block")
    return tuple(tuple(check_number("delta channel weight", float(w)) for w in ws) for ws in weights)


def feature_distance(f, f0, weights=None, attention_mask=None) -> jax.Array:
    """Mean over examples of the mean over positions of the squared (channel-weighted) Euclidean distance between
    feature vectors: tokens (B, T, C) (padding excluded when `attention_mask` (B, T) is given), maps (B, H, W, C),
    vectors (B, C). Positions are averaged, not summed, so alpha does not scale with sequence length or resolution;
    channels are summed (the paper's squared norm over channels)."""
    d = jnp.square(f.astype(jnp.float32) - f0.astype(jnp.float32))
    if weights is not None:
        if len(weights) != d.shape[-1]:
            raise ValueError(f"delta channel weights have {len(weights)} entries for a feature map of {d.shape}")
        d = d * jnp.asarray(weights, jnp.float32)
    d = d.sum(-1).reshape(d.shape[0], -1)  # (B, positions)
    if attention_mask is not None and attention_mask.shape == d.shape:
        m = attention_mask.astype(jnp.float32)
        return jnp.mean((d * m).sum(1) / jnp.maximum(m.sum(1), 1.0))
    return d.mean()


@contextlib.contextmanager
def captured_outputs(blocks: Sequence[str]) -> Iterator[dict]:
    """While a model is applied (and traced) in this context, the outputs of the modules the full-model regexes
    `blocks` name (`features.is_block`) are recorded in the yielded dict, regex -> output. Unlike
    `capture_intermediates`, this needs no mutable collection, so the step's own `apply` is unchanged."""
    seen: dict = {}

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            for block in blocks:
                if features.is_block(context.module.path, block):
                    seen[block] = out
        return out

    with nn.intercept_methods(intercept):
        yield seen


def _in_order(seen: Mapping, blocks: Sequence[str]) -> tuple:
    missing = [b for b in blocks if b not in seen]
    if missing:
        raise ValueError(f"delta compares the outputs of {missing} but no such module ran: did that tower run?")
    return tuple(seen[b] for b in blocks)


def channel_attention(
    loaded,
    batches: Iterable[Mapping],
    *,
    layers: Sequence[int] | None = None,
    params=None,
    collections: Mapping | None = None,
    loss_fn: Callable = classification_loss,
) -> tuple[tuple[float, ...], ...]:
    """DELTA's channel attention, computed once: for each compared block and channel, how much the loss grows when
    the starting model's output of that block has the channel zeroed (mean over `batches`), turned into weights by
    a softmax over the block's channels, times the channel count (mean 1, so alpha keeps its scale).

    The loss needs a head that fits the task: pass `params` after a linear probe (a fresh tljax head starts at zero,
    so every channel would weigh the same). Cost: one forward pass of the blocks above per channel and batch, on
    the default device; the loss rises are averaged over the batch before the softmax (the paper weighs per
    example).

    Returns:
      per block of `layers` (as in `delta`), one weight per channel: `delta(..., channel_weights=...)`.
    """
    blocks = delta(loaded, 1.0, layers).blocks
    variables = {"params": loaded.params if params is None else params}
    variables.update(dict(loaded.state if collections is None else collections))
    sums, count = [0.0] * len(blocks), 0
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        for i, block in enumerate(blocks):
            rises = _loss_rises(variables, batch, model=loaded.model, block=block, loss_fn=loss_fn)
            sums[i] = sums[i] + np.asarray(rises)
        count += 1
    if not count:
        raise ValueError("channel_attention saw no batches")
    return tuple(tuple(float(w) for w in len(s) * _softmax(np.asarray(s, np.float64) / count)) for s in sums)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@functools.partial(jax.jit, static_argnames=("model", "block", "loss_fn"))
def _loss_rises(variables, batch, *, model, block: str, loss_fn) -> jax.Array:
    """(C,): loss with channel c of `block`'s output zeroed minus the loss as is (inference mode). The zeroed
    output replaces the block (`prefix_cache.replaced_output`), so the blocks below run once."""
    inputs = model_inputs(batch)
    with captured_outputs((block,)) as seen:
        base = loss_fn(model.apply(variables, **inputs, train=False), batch)[0]
    hidden = seen[block]

    def dropped(c):
        keep = 1 - jax.nn.one_hot(c, hidden.shape[-1], dtype=hidden.dtype)
        with prefix_cache.replaced_output(block, hidden * keep):
            return loss_fn(model.apply(variables, **inputs, train=False), batch)[0]

    return jax.lax.map(dropped, jnp.arange(hidden.shape[-1])) - base


# --- the anchor and configs ---


Regularizer = L2SP | Delta
REGULARIZERS: dict[str, Callable[..., Regularizer]] = {"l2_sp": l2_sp, "delta": delta}
_KINDS: dict[str, type] = {"l2_sp": L2SP, "delta": Delta}


def anchor(reg: Regularizer, params, collections: Mapping | None = None, trainable: Collection[str] | None = None):
    """The starting values `reg` reads, as `TrainState.anchor` holds them: `{"params": {path: w0}}` for the
    parameters in `trainable` (paths some phase trains; None: all) that the penalty anchors, plus for DELTA the
    starting `"collections"` (BatchNorm statistics). The leaves are `params`' own arrays: copy them (or place them,
    as `engine.fit` does) before a step donates them with a state that holds `params` too."""
    keep = None if trainable is None else set(trainable)
    flat = tree.flatten(params)
    out: dict = {"params": {p: v for p, v in flat.items() if (keep is None or p in keep) and reg.anchored(p)}}
    if reg.needs_full_forward:
        out["collections"] = dict(collections or {})
    return out


def anchor_for_plan(reg: Regularizer, loaded, plan) -> dict:
    """`anchor` for a run of a resolved schedule (`freezing.Plan`) from `loaded`: the starting values of the
    parameters some phase trains."""
    trained = {p for phase in plan.phases for p, t in tree.flatten(phase.partition.trainable_mask).items() if t}
    return anchor(reg, loaded.params, loaded.state, trained)


def check_config(cfg: Mapping) -> dict:
    """A regulariser config checked without a model: known name and keys, strengths finite and >= 0.

    `{"name": "l2_sp", "alpha": 0.01, "beta": 0.01}` (optional "rules": [[regex, {"alpha": a} | {"beta": b} |
    None], ...]) or `{"name": "delta", "alpha": 0.01}` (optional "layers": [block indices], "channel_weights":
    [[one weight per channel], ...] per layer)."""
    cfg = dict(cfg)
    name = cfg.get("name")
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer name {name!r}; choose one of {sorted(REGULARIZERS)}")
    allowed = [k for k in inspect.signature(REGULARIZERS[name]).parameters if k != "loaded"]
    unknown = sorted(set(cfg) - {"name", *allowed})
    if unknown:
        raise ValueError(f"unknown {name} regularizer key(s) {unknown}; {name} takes {allowed}")
    for key in ("alpha", "beta"):
        if key in cfg:
            check_number(f"{name} {key}", cfg[key])
    for i, rule in enumerate(cfg.get("rules") or ()):
        _strength(rule, f"l2_sp rule {i}")
    return cfg


def from_config(loaded, cfg: Mapping) -> Regularizer:
    """`{"name": "l2_sp" | "delta", ...}` (see `check_config`) resolved for `loaded`."""
    kwargs = check_config(cfg)
    return REGULARIZERS[kwargs.pop("name")](loaded, **kwargs)


def resolve(spec: Mapping | Regularizer, loaded) -> Regularizer:
    """A config dict resolved for `loaded`, or an already resolved regulariser as it is."""
    return from_config(loaded, spec) if isinstance(spec, Mapping) else check_regularizer(spec)


def check_regularizer(spec) -> Regularizer:
    """A resolved regulariser, or a clear error for anything else."""
    if not isinstance(spec, L2SP | Delta):
        raise ValueError(f"a regularizer is a config dict with a 'name' or an L2SP/Delta, got {type(spec).__name__}")
    return spec


def needs_full_forward(spec: Mapping | Regularizer) -> bool:
    """Whether the regulariser must run the bottom blocks (DELTA), which a frozen-prefix cache skips."""
    if isinstance(spec, Mapping):
        return _KINDS[check_config(spec)["name"]].needs_full_forward
    return check_regularizer(spec).needs_full_forward
