"""Parameter partitions: ordered `(regex, rule)` lists -> one optax transformation over the whole tree.

    rules = [
        (r"^head/", train(lr_mult=10.0)),
        (r"encoder/layer_(10|11)/", train()),
        (r".*", FROZEN),
    ]
    part = build(params, rules, learning_rate=1e-4, optimizer="adamw", weight_decay=0.01)
    print(part.summary())
    opt_state = part.tx.init(params)   # Adam moments for trainable leaves only

Regexes are searched (`re.search`) in `/`-joined paths such as `encoder/layer_3/attention/query/kernel`; the first
match wins; every parameter must be covered and every regex must own at least one parameter (a typo must not
silently freeze or thaw nothing). Frozen groups go through `optax.set_to_zero()`, which is stateless, so they carry
no optimizer state; the training step differentiates the trainable parameters only. A rule's `clip_norm` bounds the
norm of its whole gradient, however many optax groups (by weight decay and age) its parameters fall into; clipping is
stateless and leaves the optimizer state's structure as it is. Parameters the task's loss
never reaches (`tljax.task.unused_params`) are passed as `unused=`: they are frozen whatever the rules say (no
weight decay drifts them) and shown as `unused` in the summary.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax

from tljax import tree
from tljax.fields import from_fields

LearningRate = float | Callable[[int], Any]

# Weight decay skips these by default: biases and every norm's scale/bias (all norm modules end in "norm").
NO_DECAY = (r"bias$", r"norm/")


@dataclass(frozen=True)
class Rule:
    """What the parameters a regex selects do: frozen, or trained at an LR with weight decay and optional clipping.

    Attributes:
      trainable: False freezes the parameters (no gradient work, no optimizer state).
      lr: absolute learning rate (float or optax schedule); None means `lr_mult * learning_rate` of `build`.
      lr_mult: multiplier of `build`'s base learning rate (discriminative / layer-wise LRs). Give one of `lr` and
        `lr_mult`: both is an error (an absolute LR takes no multiplier).
      weight_decay: weight decay of these parameters (biases and norms excepted, see `build`'s `no_decay`), in the
        optimizer's own convention (decoupled for AdamW, L2 on the gradient for SGD: see `build`); None means the
        `build` default.
      clip_norm: clip the gradient of all the rule's parameters jointly to this global norm (one scale over the
        rule, whatever optax groups weight decay and age split it into), after `build`'s `clip_norm` and before
        the optimizer. Stateless: it leaves the optimizer state as it is, so state carries between phases that
        clip and phases that do not.
    """

    trainable: bool = True
    lr: LearningRate | None = None
    lr_mult: float = 1.0
    weight_decay: float | None = None
    clip_norm: float | None = None

    def __post_init__(self):
        if not isinstance(self.trainable, bool):
            raise ValueError(f"rule field trainable must be True or False, got {self.trainable!r}")
        if self.lr is not None and not callable(self.lr):
            check_number("lr", self.lr)
        check_number("lr_mult", self.lr_mult)
        if self.weight_decay is not None:
            check_number("weight_decay", self.weight_decay)
        if self.clip_norm is not None:
            check_number("clip_norm", self.clip_norm, positive=True)
        if self.lr is not None and self.lr_mult != 1.0:
            raise ValueError(
                f"give one of lr (absolute) or lr_mult (a multiple of build's learning_rate), not both: got "
                f"lr={self.lr!r} and lr_mult={self.lr_mult!r}; an absolute lr takes no multiplier"
            )


def check_number(name: str, value, *, positive: bool = False) -> float:
    """A finite real >= 0 (> 0 with `positive`); anything else (negative, NaN, a string) is a ValueError."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return float(value)


def check_whole(name: str, value) -> int:
    """An int, or a float with an integral value (configs and sweeps write 3.0), as an int; anything else (2.5,
    a bool, a string) is a ValueError naming `name`."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy ints too
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


FROZEN = Rule(trainable=False)
TRAIN = Rule()


def train(**fields) -> Rule:
    """A trainable rule, e.g. `train(lr_mult=0.1, weight_decay=0.0)`."""
    return as_rule(fields)


def as_rule(spec: Any) -> Rule:
    """Accepts a `Rule`, "frozen"/None, "train", a float (LR multiplier) or a dict of `Rule` fields (configs)."""
    if isinstance(spec, Rule):
        return spec
    if spec is None or spec == "frozen":
        return FROZEN
    if spec == "train":
        return TRAIN
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return Rule(lr_mult=float(spec))
    if isinstance(spec, Mapping):
        return from_fields(Rule, spec, "rule field")
    raise ValueError(
        f"cannot read rule {spec!r}: use a Rule, 'frozen', 'train', an LR multiplier or a dict of "
        f"{[f.name for f in dataclasses.fields(Rule)]}"
    )


def assign(paths: Sequence[str], rules: Sequence[tuple[str, Any]]) -> list[int]:
    """Index of the first rule whose regex matches each path; uncovered paths and idle regexes are errors."""
    compiled = [(compile_regex(_pattern(r), f"rule {i}"), i) for i, r in enumerate(rules)]
    owner = [next((i for rx, i in compiled if rx.search(p)), None) for p in paths]
    uncovered = [p for p, o in zip(paths, owner, strict=True) if o is None]
    if uncovered:
        raise ValueError(
            f"{len(uncovered)} parameter(s) match no rule: {uncovered[:8]}. Add a rule for them or "
            "end the list with a catch-all like ('.*', FROZEN)."
        )
    idle = [i for i in range(len(rules)) if i not in set(owner)]
    if idle:
        raise ValueError("; ".join(_idle_message(rules[i][0], i, paths, compiled) for i in idle))
    return owner


def compile_regex(pattern: str, where: str) -> re.Pattern:
    """`re.compile` with an error that names the pattern and where it came from."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: invalid regex {pattern!r}: {e}") from e


def _pattern(rule_pair) -> str:
    if not (isinstance(rule_pair, tuple | list) and len(rule_pair) == 2 and isinstance(rule_pair[0], str)):
        raise ValueError(f"a rule is a (regex, rule) pair, got {rule_pair!r}")
    return rule_pair[0]


def _idle_message(pattern, i, paths, compiled) -> str:
    if not any(re.search(pattern, p) for p in paths):
        return (
            f"rule {i} regex {pattern!r} matches no parameter (e.g. paths look like {paths[:2]}); fix the typo "
            "or drop the rule"
        )
    return f"rule {i} regex {pattern!r} only matches parameters already claimed by earlier rules (first match wins)"


@dataclass(frozen=True)
class Group:
    """One optimizer group: the parameters a rule owns, split by whether weight decay applies."""

    label: str
    pattern: str
    rule: Rule
    decay: bool
    paths: tuple[str, ...]
    count: int
    nbytes: int
    lr: LearningRate
    weight_decay: float
    age: int = 0  # optimizer steps its parameters carried in from earlier phases (their optax count)

    @property
    def state(self) -> str:
        """ "train", "frozen", or "unused" (never reached by the loss, so frozen whatever the rules say)."""
        return "unused" if self.label == UNUSED else ("train" if self.rule.trainable else "frozen")


UNUSED = "unused"  # label of the group of parameters the loss never reaches


@dataclass(frozen=True)
class Partition:
    """The resolved partition: groups, a label per parameter, and the optax transformation."""

    groups: tuple[Group, ...]
    labels: Any  # pytree like params, each leaf a group label
    tx: optax.GradientTransformation

    @property
    def trainable_mask(self) -> Any:
        """Pytree of bools like params: True where the parameter trains."""
        trainable = {g.label for g in self.groups if g.rule.trainable}
        return jax.tree.map(lambda label: label in trainable, self.labels)

    def count(self, state: str | bool = True) -> int:
        """Parameters in groups of this state: "train" (or True), "frozen" (or False) or "unused"."""
        return sum(g.count for g in self._of(state))

    def nbytes(self, state: str | bool = True) -> int:
        """Bytes of the parameters in groups of this state (see `count`)."""
        return sum(g.nbytes for g in self._of(state))

    def _of(self, state: str | bool) -> list[Group]:
        state = {True: "train", False: "frozen"}.get(state, state)
        if state not in ("train", "frozen", UNUSED):
            raise ValueError(f"state must be 'train', 'frozen' or 'unused', got {state!r}")
        return [g for g in self.groups if g.state == state]

    def rows(self) -> list[dict]:
        """One dict per group (for logging as JSON) with counts, bytes, LR and weight decay."""
        return [
            {
                "group": g.label,
                "regex": g.pattern,
                "state": g.state,
                "trainable": g.rule.trainable,
                "params": g.count,
                "bytes": g.nbytes,
                "lr": _lr_repr(g.lr) if g.rule.trainable else None,
                "weight_decay": g.weight_decay if g.rule.trainable else None,
                "clip_norm": g.rule.clip_norm,
            }
            for g in self.groups
        ]

    def summary(self) -> str:
        """A table to read before a run: each group, then trainable/frozen/unused totals."""
        head = f"{'group':<10} {'regex':<34} {'state':<9} {'params':>12} {'MiB':>9} {'lr':>10} {'wd':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows():
            lr = "-" if r["lr"] is None else r["lr"]
            wd = "-" if r["weight_decay"] is None else f"{r['weight_decay']:g}"
            lines.append(
                f"{r['group']:<10} {_clip(r['regex'], 34):<34} {r['state']:<9} "
                f"{r['params']:>12,} {r['bytes'] / 2**20:>9.2f} {lr:>10} {wd:>7}"
            )
        train, total = self.count("train"), sum(g.count for g in self.groups)
        unused = self.count(UNUSED)
        lines += [
            "-" * len(head),
            f"trainable {train:,} of {total:,} parameters ({100 * train / max(total, 1):.2f}%),"
            f" {self.nbytes('train') / 2**20:.2f} MiB; frozen {self.nbytes('frozen') / 2**20:.2f} MiB"
            + (f"; unused by the loss {unused:,} parameters (kept frozen)" if unused else ""),
        ]
        return "\n".join(lines)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _lr_repr(lr) -> str:
    return f"{lr:.3g}" if isinstance(lr, int | float) else "schedule"


def _adamw(lr, wd, **kw):
    return optax.adamw(lr, weight_decay=wd, **kw)


def _sgd(lr, wd, momentum=None, nesterov=False):
    # torch.optim.SGD's weight decay: L2, `wd * w` added to the gradient before momentum (ResNet recipes' wd=1e-4)
    sgd = optax.sgd(lr, momentum=momentum, nesterov=nesterov)
    return optax.chain(optax.add_decayed_weights(wd), sgd) if wd else sgd


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": _adamw,
    "sgd": _sgd,
    "lion": lambda lr, wd, **kw: optax.lion(lr, weight_decay=wd, **kw),
    "lamb": lambda lr, wd, **kw: optax.lamb(lr, weight_decay=wd, **kw),
}


def build(
    params,
    rules: Sequence[tuple[str, Any]],
    *,
    learning_rate: LearningRate,
    optimizer: str | Callable[..., optax.GradientTransformation] = "adamw",
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = NO_DECAY,
    clip_norm: float | None = None,
    ages: Mapping[str, int] | None = None,
    unused: Collection[str] = (),
    **optimizer_kwargs,
) -> Partition:
    """Resolves `rules` over `params` (arrays or `jax.ShapeDtypeStruct`s) into groups and one optax transform.

    Args:
      params: the parameter pytree (only paths, shapes and dtypes are read).
      rules: ordered `(regex, rule)` pairs; a rule is anything `as_rule` reads.
      learning_rate: base LR (float or optax schedule) that `lr_mult` scales.
      optimizer: a name in `OPTIMIZERS` or `fn(learning_rate, weight_decay, **optimizer_kwargs)`.
      weight_decay: default weight decay of trainable parameters (rules may override), as each optimizer defines
        it: "adamw" and "lion" decay decoupled from the gradient (each step `w -= lr * wd * w`, Loshchilov & Hutter);
        "lamb" adds `wd * w` to the Adam direction before the trust ratio (You et al.); "sgd" is torch.optim.SGD's
        L2: `wd * w` is added to the gradient before momentum, so with momentum m a weight shrinks by about
        `lr * wd / (1 - m)` per step, not `lr * wd` (what ResNet recipes' wd=1e-4 means); a callable optimizer
        receives it as its second argument.
      no_decay: regexes of parameters never decayed (biases, norms); frozen parameters never are.
      clip_norm: clip the global gradient norm of all trainable parameters first (before any rule's clip_norm).
      ages: per-path optimizer steps already taken (freezing schedules): parameters of different ages get
        separate groups, so moments and step counts carry over exactly with `carry_state`.
      unused: paths the loss never reaches (`tljax.task.unused_params`): frozen and stateless in any rule set.
      optimizer_kwargs: passed to the optimizer factory (e.g. b1, b2, momentum).

    Returns:
      A `Partition` whose `tx` applies each group's optimizer and zeros frozen updates statelessly.
    """
    make = _optimizer_factory(optimizer)
    if not callable(learning_rate):
        check_number("learning_rate", learning_rate)
    check_number("weight_decay", weight_decay)
    if clip_norm is not None:
        check_number("clip_norm", clip_norm, positive=True)
    flat = tree.flatten(params)
    paths = list(flat)
    _check_unused(unused, flat)
    owner = assign(paths, rules)
    no_decay_res = [compile_regex(r, "no_decay") for r in no_decay]
    groups = _groups(flat, owner, rules, learning_rate, weight_decay, no_decay_res, dict(ages or {}), set(unused))
    label_of = {p: g.label for g in groups for p in g.paths}
    labels = tree.map_with_path(lambda p, _: label_of[p], params)
    transforms = {g.label: _group_tx(g, make, optimizer_kwargs) for g in groups}
    tx = optax.partition(transforms, labels)
    clips = _rule_clips(params, dict(zip(paths, owner, strict=True)), rules, set(unused))
    if clips is not None:
        tx = _stateless_first(clips, tx)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return Partition(tuple(groups), labels, tx)


def _check_unused(unused, flat) -> None:
    if isinstance(unused, str):
        raise TypeError(f"unused takes a collection of parameter paths, got the string {unused!r}")
    unknown = sorted(set(unused) - set(flat))
    if unknown:
        raise ValueError(f"unused names {len(unknown)} path(s) that are not parameters: {unknown[:5]}")


def _optimizer_factory(optimizer):
    if callable(optimizer):
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)} or pass a callable")
    return OPTIMIZERS[optimizer]


def _groups(flat, owner, rules, learning_rate, weight_decay, no_decay, ages, unused) -> list[Group]:
    """One group per (rule, decays?, age): parameters that share an optax transform must share its step count.
    Unused parameters form one frozen group of their own."""
    groups = []
    for i, (pattern, spec) in enumerate(rules):
        rule = as_rule(spec)
        wd = weight_decay if rule.weight_decay is None else rule.weight_decay
        buckets: dict[tuple[bool, int], list[str]] = {}
        for p, o in zip(flat, owner, strict=True):
            if o == i and p not in unused:
                decay = bool(rule.trainable and wd and not any(r.search(p) for r in no_decay))
                buckets.setdefault((decay, ages.get(p, 0) if rule.trainable else 0), []).append(p)
        for (decay, age), ps in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
            label = f"g{i}" + ("-nd" if rule.trainable and wd and not decay else "") + (f"@{age}" if age else "")
            lr = _group_lr(rule, learning_rate, age)
            groups.append(_group(label, pattern, rule, decay, ps, flat, lr, wd if decay else 0.0, age))
    if unused:
        ps = [p for p in flat if p in unused]
        groups.append(_group(UNUSED, "(not reached by the loss)", FROZEN, False, ps, flat, 0.0, 0.0, 0))
    return groups


def _group(label, pattern, rule, decay, ps, flat, lr, wd, age) -> Group:
    sub = {p: flat[p] for p in ps}
    return Group(label, pattern, rule, decay, tuple(ps), tree.count(sub), tree.nbytes(sub), lr, wd, age)


def _group_lr(rule: Rule, base: LearningRate, age: int = 0) -> LearningRate:
    """The group's LR; schedules see the phase-local step (optax's count minus the steps carried in)."""
    lr = rule.lr if rule.lr is not None else base
    mult = 1.0 if rule.lr is not None else rule.lr_mult
    if not callable(lr):
        return lr * mult
    if mult == 1.0 and age == 0:
        return lr
    return lambda count: mult * lr(count - age)


def _group_tx(g: Group, make, optimizer_kwargs) -> optax.GradientTransformation:
    """The group's optimizer. A constant LR is passed as a schedule too, so the state structure (a schedule keeps a
    step count) does not depend on whether a phase's LR is constant: a group that moves from a constant-LR phase to
    a scheduled one (LP-FT's probe into a cosine fine-tune) carries its state over. Clipping is not here: a rule's
    clip spans all its groups (`_rule_clips`)."""
    if not g.rule.trainable:
        return optax.set_to_zero()
    lr = g.lr if callable(g.lr) else optax.constant_schedule(g.lr)
    return make(lr, g.weight_decay, **optimizer_kwargs)


def _rule_clips(params, owner: Mapping[str, int], rules, unused) -> optax.GradientTransformation | None:
    """One `clip_by_global_norm` per trainable rule with a `clip_norm`, masked to the rule's parameters, so the norm
    is the rule's whole gradient's (its decay / no-decay and age groups together); None if no rule clips."""
    clips = []
    for i, (_, spec) in enumerate(rules):
        rule = as_rule(spec)
        if rule.trainable and rule.clip_norm is not None:
            mask = tree.map_with_path(lambda p, _, i=i: owner[p] == i and p not in unused, params)
            clips.append(optax.masked(optax.clip_by_global_norm(rule.clip_norm), mask))
    return optax.chain(*clips) if clips else None


def _stateless_first(first: optax.GradientTransformation, tx: optax.GradientTransformation):
    """`tx` after the stateless `first` (clips): the state is `tx`'s alone, the same with or without `first`, so a
    phase that clips and one that does not share their optimizer state's structure (`carry_state`)."""

    def update(updates, state, params=None, **extra_args):
        updates, _ = first.update(updates, first.init(updates), params)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def state_nbytes(opt_state) -> int:
    """Bytes of the floating-point arrays in an optimizer state (moments; step counters excluded)."""
    leaves = [x for x in jax.tree.leaves(opt_state) if np.issubdtype(np.dtype(x.dtype), np.floating)]
    return tree.nbytes(leaves)


def carry_state(old_state, old: Partition, new: Partition, params):
    """The optimizer state for `new`, carrying over exactly what `old` had for parameters that keep training.

    Groups of `new` with age > 0 (built with `ages`) take their moments per parameter and their step counts from
    `old`'s groups; groups with age 0 (newly thawed) start fresh; frozen groups hold no state. Both partitions must
    use the same optimizer, so the per-group state structures agree.
    """
    old_index = _index_state(old_state, set(tree.flatten(old.labels)))
    old_label = tree.flatten(old.labels)
    fresh = new.tx.init(params)
    param_paths = set(tree.flatten(new.labels))
    by_label = {g.label: g for g in new.groups}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    out = []
    for key_path, leaf in leaves:
        label, where, param = _locate(key_path, param_paths)
        group = by_label.get(label)
        if group is None or group.age == 0:
            out.append(leaf)
            continue
        source = (old_label[param if param else group.paths[0]], where, param)
        if source not in old_index:
            raise ValueError(
                f"cannot carry optimizer state of {param or label!r} from the previous phase: its state "
                "structure differs (phases must share the optimizer to carry state over)"
            )
        out.append(old_index[source])
    return jax.tree_util.tree_unflatten(treedef, out)


def _index_state(state, param_paths) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {_locate(kp, param_paths): leaf for kp, leaf in leaves}


def state_by_param(opt_state, params) -> dict[str, Any]:
    """Per-parameter optimizer-state leaves keyed `"<slot>:<param path>"` (e.g. `"|/0/mu:head/out/kernel"`),
    independent of group labels: compare or inspect states of differently grouped partitions."""
    index = _index_state(opt_state, set(tree.flatten(params)))
    return {f"{where}:{param}": leaf for (_, where, param), leaf in index.items() if param is not None}


def _locate(key_path, param_paths) -> tuple[str | None, str, str | None]:
    """(group label, position inside the group's state, parameter path or None for scalars like counts)."""
    parts = [_key_str(k) for k in key_path]
    label = None
    if "inner_states" in parts:
        i = parts.index("inner_states")
        label, parts = parts[i + 1], parts[:i] + ["|"] + parts[i + 2 :]
    for start in range(len(parts)):
        candidate = tree.SEP.join(parts[start:])
        if candidate in param_paths:
            return label, tree.SEP.join(parts[:start]), candidate
    return label, tree.SEP.join(parts), None


def _key_str(k) -> str:
    return jax.tree_util.keystr((k,), simple=True)
