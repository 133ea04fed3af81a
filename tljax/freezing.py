"""Freezing schedules: *when* parameters thaw, as data.

A schedule is an ordered list of phases; each phase has a length (steps or epochs), a rule set (a name from
`tljax.rules` with its arguments, or an explicit `(regex, rule)` list) and a learning rate (a float or an LR
schedule spec). Built-ins cover the literature:

    sched = freezing.get("lp_ft", loaded, probe_steps=500, ft_steps=2000, probe_lr=1e-3, ft_lr=1e-5)
    sched = freezing.get("gradual_unfreeze", loaded, steps_per_stage=300, lr=1e-4, decay=1 / 2.6)  # ULMFiT
    cfg = sched.to_config(); same = FreezingSchedule.from_config(cfg)   # sweeps enumerate configs
    plan = freezing.resolve(sched, loaded, steps_per_epoch=100)          # each phase's span and partition

At a phase boundary the partition is rebuilt (frozen parameters keep costing nothing) and the optimizer state
carries over per parameter (`partition.carry_state`): groups trainable on both sides keep moments and counts,
thawed groups start fresh, frozen ones drop their state. A parameter's "age" (its consecutive optimizer steps) is a
pure function of the schedule and the step, so resuming needs nothing beyond the step counter.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_collections
import optax

from tljax import partition, rules
from tljax.fields import from_fields


@dataclass(frozen=True)
class Phase:
    """One phase: its length, what trains (rule set) and at what learning rate.

    `steps` is a whole number (3.0 from a config is 3; 2.5 is an error, never truncated); `epochs` may be
    fractional and rounds up to whole steps.
    """

    steps: int | None = None
    epochs: float | None = None
    rules: str | Sequence = "full"  # a `tljax.rules` name, or an explicit (regex, rule) list
    rule_args: Mapping[str, Any] = field(default_factory=dict)
    learning_rate: float | Mapping[str, Any] = 1e-3  # float or LR spec, see `lr_schedule`
    name: str = ""

    def __post_init__(self):
        if self.steps is not None:
            object.__setattr__(self, "steps", partition.check_whole(f"phase {self.name!r}: steps", self.steps))

    def length(self, steps_per_epoch: int | None) -> int:
        """Steps in this phase; epochs need `steps_per_epoch`."""
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"phase {self.name!r} must set exactly one of steps / epochs")
        if self.epochs is not None:
            if not steps_per_epoch:
                raise ValueError(f"phase {self.name!r} is given in epochs: pass steps_per_epoch")
            n = math.ceil(self.epochs * steps_per_epoch)
        else:
            n = self.steps
        if n <= 0:
            raise ValueError(f"phase {self.name!r} has length {n}: every phase needs at least one step")
        return n

    def resolve_rules(self, loaded) -> list:
        """The phase's explicit (regex, rule) list for this model."""
        if isinstance(self.rules, str):
            return rules.get(self.rules, loaded, **dict(self.rule_args))
        if self.rule_args:
            raise ValueError(f"phase {self.name!r}: rule_args only apply to a named rule set")
        return [tuple(pair) for pair in self.rules]


@dataclass(frozen=True)
class FreezingSchedule:
    """An ordered list of phases."""

    phases: tuple[Phase, ...]
    name: str = "custom"

    def __post_init__(self):
        if not self.phases:
            raise ValueError("a freezing schedule needs at least one phase")

    def lengths(self, steps_per_epoch: int | None = None) -> list[int]:
        return [p.length(steps_per_epoch) for p in self.phases]

    def total_steps(self, steps_per_epoch: int | None = None) -> int:
        return sum(self.lengths(steps_per_epoch))

    def to_config(self) -> ml_collections.ConfigDict:
        """Plain-data form for configs and sweeps (LRs must be floats or specs, not callables)."""
        return ml_collections.ConfigDict({"name": self.name, "phases": [_phase_dict(p) for p in self.phases]})

    @classmethod
    def from_config(cls, cfg) -> FreezingSchedule:
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        unknown = sorted(set(cfg) - {"name", "phases"})
        if unknown:
            raise ValueError(f"unknown schedule config key(s) {unknown}; expected 'name' and 'phases'")
        return cls(tuple(_phase_from(d) for d in cfg["phases"]), cfg.get("name", "custom"))


def _phase_dict(p: Phase) -> dict:
    out = dataclasses.asdict(p)
    if not isinstance(p.rules, str):
        out["rules"] = [(rx, _rule_data(r)) for rx, r in p.rules]
    if callable(p.learning_rate):
        raise ValueError(f"phase {p.name!r}: a callable learning rate cannot go into a config; use a spec dict")
    out["rule_args"] = dict(p.rule_args)
    return out


def _rule_data(r):
    rule = partition.as_rule(r)
    return {k: v for k, v in dataclasses.asdict(rule).items() if v != getattr(partition.TRAIN, k)}


def _phase_from(d: Mapping) -> Phase:
    d = dict(d)
    if not isinstance(d.get("rules", "full"), str):
        d["rules"] = tuple((rx, r) for rx, r in d["rules"])
    if isinstance(d.get("learning_rate"), Mapping):
        d["learning_rate"] = dict(d["learning_rate"])
    return from_fields(Phase, d, "phase field")


def lr_schedule(spec: float | Mapping[str, Any], steps: int):
    """A float, or an optax schedule over a phase's local steps from a spec dict:

    {"schedule": "constant", "value": v} | {"schedule": "cosine", "peak": v, "warmup_steps": w, "end_value": e}
    | {"schedule": "linear", "init": a, "end": b} | {"schedule": "slanted_triangular", "peak": v,
    "cut_frac": 0.1, "ratio": 32} (ULMFiT: linear rise over cut_frac of the phase, then linear decay to peak/ratio).
    Cosine warms up linearly from 0 to `peak` over `warmup_steps` (a whole number, at most the phase's steps), then
    decays to `end_value` over the rest; a phase that is all warm-up only rises toward the peak.
    Every number must be finite and >= 0 (a negative or NaN learning rate is an error, never a silent ascent).
    """
    if not isinstance(spec, Mapping):
        return partition.check_number("learning rate", spec)
    spec = dict(spec)
    kind = spec.pop("schedule", None)
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown LR schedule {kind!r}; choose one of {sorted(LR_SCHEDULES)}")
    for key, value in spec.items():
        partition.check_number(f"LR schedule {kind!r}: {key}", value, positive=key == "ratio")
    if "warmup_steps" in spec:
        spec["warmup_steps"] = partition.check_whole(f"LR schedule {kind!r}: warmup_steps", spec["warmup_steps"])
    if spec.get("warmup_steps", 0) > steps or not 0 < spec.get("cut_frac", 0.5) <= 1:
        raise ValueError(f"LR schedule {kind!r}: need warmup_steps <= the phase's {steps} steps and 0 < cut_frac <= 1")
    try:
        return LR_SCHEDULES[kind](steps, **spec)
    except TypeError as e:
        raise ValueError(f"bad arguments for LR schedule {kind!r}: {e}") from e


def _slanted_triangular(steps, peak, cut_frac=0.1, ratio=32.0):
    cut = max(1, int(steps * cut_frac))
    up = optax.linear_schedule(peak / ratio, peak, cut)
    down = optax.linear_schedule(peak, peak / ratio, max(1, steps - cut))
    return optax.join_schedules([up, down], [cut])


def _cosine(steps, peak, warmup_steps=0, end_value=0.0):
    if warmup_steps == steps:  # all warm-up: optax's cosine part would have zero steps
        return optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else peak, peak, warmup_steps, steps, end_value)


LR_SCHEDULES: dict[str, Callable] = {
    "constant": lambda steps, value: optax.constant_schedule(value),
    "cosine": _cosine,
    "linear": lambda steps, init, end: optax.linear_schedule(init, end, steps),
    "slanted_triangular": _slanted_triangular,
}


@dataclass(frozen=True)
class PlannedPhase:
    """One phase of a resolved schedule: global steps [start, stop) and the partition they train under."""

    index: int
    name: str
    start: int
    stop: int
    partition: partition.Partition


@dataclass(frozen=True)
class Plan:
    """A schedule resolved once against one model, task and epoch length; the loop, checkpoints and resume read it.

    Each phase's partition groups parameters by age (consecutive optimizer steps before the phase), so optimizer
    state carries over exactly (`partition.carry_state`) and a state's structure follows from its step alone.
    """

    schedule: FreezingSchedule
    phases: tuple[PlannedPhase, ...]

    @property
    def total_steps(self) -> int:
        return self.phases[-1].stop

    def phase_at(self, step: int) -> int:
        """Index of the phase that global `step` belongs to (len(phases) once the schedule is done)."""
        return next((p.index for p in self.phases if step < p.stop), len(self.phases))

    def producing_phase(self, step: int) -> int:
        """The phase whose partition shaped the state saved after `step` steps: the one that ran step - 1 (at a
        phase boundary, the phase before `phase_at(step)`)."""
        return self.phase_at(max(step - 1, 0))

    def summary(self) -> str:
        """One line per phase: span and trainable / frozen / unused parameter counts."""
        lines = [f"{'phase':<14} {'steps':>13} {'trainable':>12} {'frozen':>12} {'unused':>10}"]
        for p in self.phases:
            part = p.partition
            lines.append(
                f"{p.name[:14]:<14} {f'{p.start}-{p.stop}':>13} {part.count('train'):>12,} "
                f"{part.count('frozen'):>12,} {part.count('unused'):>10,}"
            )
        return "\n".join(lines)


def resolve(
    schedule: FreezingSchedule, loaded, *, steps_per_epoch: int | None = None, unused=(), **build_kwargs
) -> Plan:
    """Resolves every phase against the model now (a bad phase fails before any training).

    Args:
      steps_per_epoch: resolves phases given in epochs.
      unused: parameter paths the task's loss never reaches (`tljax.task.unused_params`): frozen in every phase.
      build_kwargs: passed to `partition.build` for every phase (optimizer, weight_decay, clip_norm, ...).
    """
    lengths = schedule.lengths(steps_per_epoch)
    phases, ages, start = [], {}, 0
    for i, (phase, n) in enumerate(zip(schedule.phases, lengths, strict=True)):
        try:
            part = partition.build(
                loaded.params,
                phase.resolve_rules(loaded),
                learning_rate=lr_schedule(phase.learning_rate, n),
                ages=ages,
                unused=unused,
                **build_kwargs,
            )
        except (ValueError, TypeError) as e:
            raise ValueError(f"phase {i} ({phase.name or phase.rules!r}) of schedule {schedule.name!r}: {e}") from e
        phases.append(PlannedPhase(i, phase.name or f"phase_{i}", start, start + n, part))
        trained = {p for g in part.groups if g.rule.trainable for p in g.paths}
        ages, start = {p: ages.get(p, 0) + n for p in trained}, start + n
    return Plan(schedule, tuple(phases))


# ---- built-in schedules -------------------------------------------------------------------------------------------


def full(loaded, steps: int, lr=1e-4) -> FreezingSchedule:
    return FreezingSchedule((Phase(steps, rules="full", learning_rate=lr, name="full"),), "full")


def linear_probe(loaded, steps: int, lr=1e-3) -> FreezingSchedule:
    return FreezingSchedule((Phase(steps, rules="linear_probe", learning_rate=lr, name="probe"),), "linear_probe")


def lp_ft(loaded, probe_steps: int, ft_steps: int, probe_lr=1e-3, ft_lr=1e-5) -> FreezingSchedule:
    """LP-FT (Kumar et al., 2022): fit the head on frozen features, then fine-tune everything at a small LR."""
    return _then_full("lp_ft", Phase(probe_steps, rules="linear_probe", learning_rate=probe_lr, name="probe"),
                      ft_steps, ft_lr)  # fmt: skip


def _then_full(name: str, first: Phase, ft_steps: int, ft_lr) -> FreezingSchedule:
    return FreezingSchedule((first, Phase(ft_steps, rules="full", learning_rate=ft_lr, name="finetune")), name)


def gradual_unfreeze(loaded, steps_per_stage: int, lr=1e-4, decay: float | None = None) -> FreezingSchedule:
    """ULMFiT gradual unfreezing: head alone, then one more block per stage from the top, then everything.

    `decay` (e.g. 1/2.6) turns on discriminative LRs: block i trains at `lr * decay ** (depth - layer_id)`.
    """
    n = loaded.family.num_layers(loaded.hf_config)
    stages = [Phase(steps_per_stage, rules="linear_probe", learning_rate=lr, name="head")]
    for k in range(1, n + 1):
        stages.append(
            Phase(steps_per_stage, rules="top_k", rule_args={"k": k, "decay": decay}, learning_rate=lr, name=f"top_{k}")
        )
    last = Phase(
        steps_per_stage,
        rules="llrd" if decay else "full",
        rule_args={"decay": decay} if decay else {},
        learning_rate=lr,
        name="all",
    )
    return FreezingSchedule(tuple(stages + [last]), "gradual_unfreeze")


def chain_thaw(loaded, steps_per_stage: int, lr=1e-4, final_steps: int | None = None) -> FreezingSchedule:
    """Chain-thaw (Felbo et al., 2017): the head alone, then each layer alone from the bottom, then all (for
    `final_steps` steps; None means `steps_per_stage`, and 0 is an error like any empty phase)."""
    n = loaded.family.num_layers(loaded.hf_config)
    groups = ["head", "stem", *range(n)]
    stages = [
        Phase(steps_per_stage, rules="single", rule_args={"group": g}, learning_rate=lr, name=f"only_{g}")
        for g in groups
    ]
    final = steps_per_stage if final_steps is None else final_steps
    stages.append(Phase(final, rules="full", learning_rate=lr, name="all"))
    return FreezingSchedule(tuple(stages), "chain_thaw")


def surgical(loaded, block: int, steps: int, lr=1e-4) -> FreezingSchedule:
    block = partition.check_whole("surgical: block", block)
    phase = Phase(steps, rules="surgical", rule_args={"block": block}, learning_rate=lr, name=f"block_{block}")
    return FreezingSchedule((phase,), "surgical")


def top_k(loaded, k: int, steps: int, lr=1e-4) -> FreezingSchedule:
    """The top k blocks and the head train, the rest stays frozen (Yosinski et al. 2014's partial fine-tuning)."""
    k = partition.check_whole("top_k: k", k)
    phase = Phase(steps, rules="top_k", rule_args={"k": k}, learning_rate=lr, name=f"top_{k}")
    return FreezingSchedule((phase,), "top_k")


def bitfit(loaded, steps: int, lr=1e-3) -> FreezingSchedule:
    return FreezingSchedule((Phase(steps, rules="bitfit", learning_rate=lr, name="bitfit"),), "bitfit")


def peft(loaded, steps: int, lr=1e-3) -> FreezingSchedule:
    """Only the PEFT parameters (`tljax.peft.apply`: LoRA, adapters, prompts) and the head train."""
    return FreezingSchedule((Phase(steps, rules="peft", learning_rate=lr, name="peft"),), "peft")


def peft_then_full(loaded, peft_steps: int, ft_steps: int, peft_lr=1e-3, ft_lr=1e-5) -> FreezingSchedule:
    """The PEFT parameters and head first, then everything (their LP-FT analogue: a good start for full FT)."""
    return _then_full("peft_then_full", Phase(peft_steps, rules="peft", learning_rate=peft_lr, name="peft"),
                      ft_steps, ft_lr)  # fmt: skip


def llrd(loaded, steps: int, decay: float = 0.65, lr=1e-4) -> FreezingSchedule:
    phase = Phase(steps, rules="llrd", rule_args={"decay": decay}, learning_rate=lr, name="llrd")
    return FreezingSchedule((phase,), "llrd")


def keras_recipe(loaded, head_steps: int, finetune_steps: int, lr=1e-3, top_n: int = 2, lr_div=100.0):
    """The classic Keras transfer recipe: train a new head on a frozen base, then thaw the top N blocks and
    continue at `lr / lr_div`."""
    return FreezingSchedule(
        (
            Phase(head_steps, rules="linear_probe", learning_rate=lr, name="head"),
            Phase(finetune_steps, rules="top_k", rule_args={"k": top_n}, learning_rate=lr / lr_div, name="top_n"),
        ),
        "keras_recipe",
    )


SCHEDULES: dict[str, Callable[..., FreezingSchedule]] = {
    "full": full, "linear_probe": linear_probe, "lp_ft": lp_ft, "gradual_unfreeze": gradual_unfreeze,
    "chain_thaw": chain_thaw, "surgical": surgical, "bitfit": bitfit, "llrd": llrd, "keras_recipe": keras_recipe,
    "peft": peft, "peft_then_full": peft_then_full, "top_k": top_k,
}  # fmt: skip


def get(name: str, loaded, **kwargs) -> FreezingSchedule:
    """A built-in schedule by name: `get("lp_ft", loaded, probe_steps=100, ft_steps=400)`."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown freezing schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    fn = SCHEDULES[name]
    try:
        inspect.signature(fn).bind(loaded, **kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(fn).parameters if p != "loaded"]
        raise ValueError(f"schedule {name!r}: {e} (its arguments: {params})") from None
    return fn(loaded, **kwargs)
