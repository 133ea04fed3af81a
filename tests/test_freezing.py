"""Freezing schedules through the engine's one loop: exact optimizer-state carry-over, resume mid-schedule and at a
phase boundary, built-ins, the resolved plan, bad schedules."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import token_batch
from engine_driver import preempted

import tljax.models as tm
from tljax import engine, freezing, tree
from tljax import partition as P
from tljax.checkpoints import CheckpointConfig
from tljax.engine import EngineConfig
from tljax.freezing import FreezingSchedule, Phase


@pytest.fixture(scope="module")
def clf(tiny_bert_dir):
    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="pooler")
    params = jax.tree.map(lambda x: x, loaded.params)  # a non-zero head so gradients reach the backbone
    params["head"]["out"]["kernel"] = jnp.full_like(params["head"]["out"]["kernel"], 0.1)
    return dataclasses.replace(loaded, params=params)


def batches(start=0):
    for i in itertools.count(start):
        ids, mask = token_batch(4, 8, seed=i)
        yield {"input_ids": ids, "attention_mask": mask, "labels": np.array([i % 3, 1, 2, 0])}


def run_schedule(loaded, sched, data=batches, workdir=None, **optimizer):
    """One engine run on one device, in memory unless a workdir is given (then checkpoints every step)."""
    cfg = EngineConfig(
        workdir=workdir, devices=1, progress=False, optimizer=optimizer, checkpoint=CheckpointConfig(every=1, keep=9)
    )
    result = engine.fit(loaded, sched, data, cfg)
    return result.state, result.history


def stop_after(n):
    return preempted(n, batches)


def _same_state(a, b, params) -> bool:
    """Optimizer states equal per parameter (group labels may differ between partitions)."""
    sa, sb = P.state_by_param(a, params), P.state_by_param(b, params)
    return set(sa) == set(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)


def _bitwise_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


TOP1 = [("^head/", "train"), ("layer_1/", "train"), ("pooler/", "train"), (".*", None)]


def test_split_into_phases_equals_one_phase(clf):
    one = FreezingSchedule((Phase(6, rules=TOP1, learning_rate=1e-2),))
    two = FreezingSchedule((Phase(2, rules=TOP1, learning_rate=1e-2), Phase(4, rules=TOP1, learning_rate=1e-2)))
    s1, _ = run_schedule(clf, one, weight_decay=0.01)
    s2, hist = run_schedule(clf, two, weight_decay=0.01)
    assert [h.end for h in hist] == [2, 6]
    assert _bitwise_equal(s1.params, s2.params) and _same_state(s1.opt_state, s2.opt_state, s1.params)


def test_thawing_a_group_keeps_the_carried_group_exact(clf):
    """Phase 2 thaws layer_0 at LR 0 (forward unchanged): the carried groups match an uninterrupted run.

    Not bitwise: the thawed phase compiles a different program (layer_0's backward added), and XLA's fusion of the
    shared parts may round differently in the last ulp. With unchanged rules the split run is bitwise equal (above).
    """
    thaw = [("layer_0/", P.train(lr=0.0, weight_decay=0.0))] + TOP1
    one = FreezingSchedule((Phase(5, rules=TOP1, learning_rate=1e-2),))
    two = FreezingSchedule((Phase(2, rules=TOP1, learning_rate=1e-2), Phase(3, rules=thaw, learning_rate=1e-2)))
    kw = {"optimizer": "sgd", "momentum": 0.9}  # stateful; Adam would blow last-ulp gradient noise up to ~lr
    s1, _ = run_schedule(clf, one, **kw)
    s2, hist = run_schedule(clf, two, **kw)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert hist[1].trainable_params > hist[0].trainable_params


def test_carry_state_moments_counts_and_fresh_groups(clf):
    sched = FreezingSchedule(
        (Phase(3, rules=TOP1, learning_rate=1e-2), Phase(1, rules=[("layer_0/", "train")] + TOP1, learning_rate=1e-2))
    )
    state, _ = run_schedule(clf, FreezingSchedule(sched.phases[:1]))  # the first phase alone: 3 steps
    plan = freezing.resolve(sched, clf)
    old, new = plan.phases[0].partition, plan.phases[1].partition
    assert {g.label: g.age for g in new.groups if g.rule.trainable} == {"g0": 0, "g1@3": 3, "g2@3": 3, "g3@3": 3}
    carried = P.carry_state(state.opt_state, old, new, state.params)
    by_label = carried.inner_states
    assert int(by_label["g1@3"].inner_state[0].count) == 3 and int(by_label["g0"].inner_state[0].count) == 0
    mu_new = tree.flatten(by_label["g0"].inner_state[0].mu)
    assert mu_new and all(not np.any(v) for v in mu_new.values())  # layer_0 thaws: fresh zeros
    old_mu = tree.flatten(state.opt_state.inner_states["g0"].inner_state[0].mu)  # head in phase 0 was g0
    new_mu = tree.flatten(by_label["g1@3"].inner_state[0].mu)
    assert set(new_mu) == set(old_mu) and all(np.array_equal(new_mu[p], old_mu[p]) for p in new_mu)


def test_constant_then_scheduled_lr_carries_state(clf):
    """Regression: a group trained at a constant LR could not carry its state into a phase with an LR schedule
    (LP-FT's probe into a cosine fine-tune): a schedule keeps a step count, so the two states differed."""
    cosine = {"schedule": "cosine", "peak": 1e-2, "warmup_steps": 1}
    sched = FreezingSchedule((Phase(2, rules=TOP1, learning_rate=1e-2), Phase(2, rules=TOP1, learning_rate=cosine)))
    state, hist = run_schedule(clf, sched)
    assert [h.end for h in hist] == [2, 4]
    assert int(state.opt_state.inner_states["g0@2"].inner_state[0].count) == 4


def test_frozen_groups_hold_no_state_in_every_phase(clf):
    sched = freezing.get("gradual_unfreeze", clf, steps_per_stage=1, lr=1e-3)
    _, hist = run_schedule(clf, sched)
    plan = freezing.resolve(sched, clf)
    for h in hist:
        assert h.opt_state_bytes == 2 * plan.phases[h.index].partition.nbytes("train"), h.name


@pytest.mark.parametrize("stop", [4, 2], ids=["mid_phase", "phase_boundary"])
def test_resume_equals_no_interruption(clf, tmp_path, stop):
    """Regression (phase_boundary): a state saved at the end of a phase holds that phase's optimizer layout;
    resuming it used to build the next phase's restore target (tree mismatch) and skip the carry-over."""
    sched = freezing.get("lp_ft", clf, probe_steps=2, ft_steps=4, probe_lr=1e-2, ft_lr=1e-3)
    full, _ = run_schedule(clf, sched, weight_decay=0.01)
    half, _ = run_schedule(clf, sched, stop_after(stop), workdir=str(tmp_path), weight_decay=0.01)
    assert int(half.step) == stop
    resumed, hist = run_schedule(clf, sched, workdir=str(tmp_path), weight_decay=0.01)
    assert hist[0].start == stop and int(resumed.step) == 6
    assert _bitwise_equal(full.params, resumed.params) and _same_state(full.opt_state, resumed.opt_state, full.params)


HEAD, BLOCK, POOLER, EMB = 99, 6789, 1056, 5344  # tiny BERT (+3-way head) parameter counts per part
BUILTINS = {
    "full": ({"steps": 1}, [HEAD + 2 * BLOCK + POOLER + EMB]),
    "linear_probe": ({"steps": 1}, [HEAD]),
    "lp_ft": ({"probe_steps": 1, "ft_steps": 1}, [HEAD, HEAD + 2 * BLOCK + POOLER + EMB]),
    "gradual_unfreeze": (
        {"steps_per_stage": 1, "decay": 0.5},
        [HEAD, HEAD + BLOCK + POOLER, HEAD + 2 * BLOCK + POOLER, HEAD + 2 * BLOCK + POOLER + EMB],
    ),
    "chain_thaw": ({"steps_per_stage": 1}, [HEAD, EMB, BLOCK, BLOCK, HEAD + 2 * BLOCK + POOLER + EMB]),
    "surgical": ({"block": 0, "steps": 1}, [HEAD + BLOCK]),
    "top_k": ({"k": 1, "steps": 1}, [HEAD + BLOCK + POOLER]),
    "bitfit": ({"steps": 1}, None),
    "llrd": ({"steps": 1, "decay": 0.8}, [HEAD + 2 * BLOCK + POOLER + EMB]),
    "keras_recipe": ({"head_steps": 1, "finetune_steps": 1, "top_n": 1}, [HEAD, HEAD + BLOCK + POOLER]),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_schedules_run_with_expected_trainable_counts(clf, name):
    kwargs, expected = BUILTINS[name]
    sched = freezing.get(name, clf, **kwargs)
    state, hist = run_schedule(clf, sched)
    assert int(state.step) == sched.total_steps() == len(hist)
    if expected is None:  # bitfit: every bias plus the head's kernel
        biases = sum(v.size for p, v in tree.flatten(clf.params).items() if p.endswith("bias"))
        expected = [biases + clf.params["head"]["out"]["kernel"].size]
    assert [h.trainable_params for h in hist] == expected
    assert all(np.isfinite(h.metrics["loss"]) for h in hist)
    assert FreezingSchedule.from_config(sched.to_config()) == sched


def test_param_counts_table_is_right(clf):
    flat = tree.flatten(clf.params)
    size = lambda prefix: sum(v.size for p, v in flat.items() if p.startswith(prefix))
    assert (
        size("head/"),
        size("backbone/encoder/layer_0/"),
        size("backbone/pooler/"),
        size("backbone/embeddings/"),
    ) == (HEAD, BLOCK, POOLER, EMB)


def test_lr_specs():
    assert freezing.lr_schedule(0.1, 10) == 0.1
    stlr = freezing.lr_schedule({"schedule": "slanted_triangular", "peak": 1.0, "cut_frac": 0.1, "ratio": 32}, 100)
    assert float(stlr(0)) == pytest.approx(1 / 32) and float(stlr(10)) == pytest.approx(1.0)
    assert float(stlr(100)) == pytest.approx(1 / 32)
    cos = freezing.lr_schedule({"schedule": "cosine", "peak": 1.0, "warmup_steps": 5}, 50)
    assert float(cos(5)) == pytest.approx(1.0) and float(cos(50)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown LR schedule 'cosin'"):
        freezing.lr_schedule({"schedule": "cosin", "peak": 1.0}, 10)
    with pytest.raises(ValueError, match="bad arguments for LR schedule 'linear'"):
        freezing.lr_schedule({"schedule": "linear", "peak": 1.0}, 10)


def test_phase_local_schedule_continues_for_carried_groups(clf):
    """A carried group's LR schedule restarts with its phase even though its optax count continues."""
    spec = {"schedule": "linear", "init": 1.0, "end": 0.0}
    sched = FreezingSchedule((Phase(4, rules=TOP1, learning_rate=0.1), Phase(10, rules=TOP1, learning_rate=spec)))
    part = freezing.resolve(sched, clf).phases[1].partition
    g = next(g for g in part.groups if g.age == 4)
    assert float(g.lr(4)) == pytest.approx(1.0) and float(g.lr(9)) == pytest.approx(0.5)


def test_bad_schedules_have_clear_errors(clf):
    with pytest.raises(ValueError, match="length 0: every phase needs at least one step"):
        run_schedule(clf, FreezingSchedule((Phase(0, rules="full"),)))
    with pytest.raises(ValueError, match=r"phase 0 .* match no rule"):
        run_schedule(clf, FreezingSchedule((Phase(1, rules=[("^head/", "train")]),)))
    with pytest.raises(ValueError, match=r"phase 1 .* only matches parameters already claimed"):
        bad = [(".*", "train"), ("^head/", None)]
        run_schedule(clf, FreezingSchedule((Phase(1, rules="full"), Phase(1, rules=bad))))
    with pytest.raises(ValueError, match=r"phase 0 .* rule 0: invalid regex '\(head': missing \)"):
        freezing.resolve(FreezingSchedule((Phase(1, rules=[("(head", "train"), (".*", None)]),)), clf)
    with pytest.raises(ValueError, match="unknown freezing schedule 'lpft'"):
        freezing.get("lpft", clf)
    with pytest.raises(ValueError, match="exactly one of steps / epochs"):
        FreezingSchedule((Phase(steps=1, epochs=1),)).lengths()
    with pytest.raises(ValueError, match="pass steps_per_epoch"):
        FreezingSchedule((Phase(epochs=1),)).lengths()
    with pytest.raises(ValueError, match=r"unknown phase field\(s\) \['stepz'\]"):
        FreezingSchedule.from_config({"phases": [{"stepz": 3}]})
    with pytest.raises(ValueError, match="at least one phase"):
        FreezingSchedule(())


def test_plan_resolves_epochs_phase_lookup_and_producing_phase(clf):
    sched = FreezingSchedule((Phase(epochs=1), Phase(epochs=0.5), Phase(steps=3)))
    assert sched.lengths(steps_per_epoch=10) == [10, 5, 3]
    plan = freezing.resolve(sched, clf, steps_per_epoch=10)
    assert [(p.start, p.stop) for p in plan.phases] == [(0, 10), (10, 15), (15, 18)] and plan.total_steps == 18
    assert [plan.phase_at(s) for s in (0, 9, 10, 14, 15, 17, 18)] == [0, 0, 1, 1, 2, 2, 3]
    assert [plan.producing_phase(s) for s in (0, 1, 10, 11, 15, 18)] == [0, 0, 0, 1, 1, 2]


def test_negative_or_nan_learning_rates_are_errors(clf):
    for lr, match in [(-1e-3, "learning rate must be a finite number >= 0, got -0.001"), (float("nan"), "got nan")]:
        with pytest.raises(ValueError, match=match):
            freezing.resolve(FreezingSchedule((Phase(1, rules="full", learning_rate=lr),)), clf)
    spec = {"schedule": "cosine", "peak": -1.0}
    with pytest.raises(ValueError, match="LR schedule 'cosine': peak must be a finite number >= 0, got -1.0"):
        freezing.resolve(FreezingSchedule((Phase(10, rules="full", learning_rate=spec),)), clf)
    with pytest.raises(ValueError, match="warmup_steps <= the phase's 10 steps"):
        freezing.lr_schedule({"schedule": "cosine", "peak": 1.0, "warmup_steps": 20}, 10)


def test_compilation_cache_persists_programs(tmp_path):
    import os

    from tljax.engine import enable_compilation_cache

    assert enable_compilation_cache(str(tmp_path)) == str(tmp_path)
    jax.jit(lambda x: jnp.cos(x) @ x.T * 3.0)(jnp.ones((8, 8))).block_until_ready()
    assert os.listdir(tmp_path)  # the compiled program is on disk for the next run


def test_rule_clip_norm_is_joint_across_age_groups(clf):
    """Regression: in a later phase a rule's parameters split by age (and by weight decay) into several optax
    groups; its clip_norm must bound the norm of the rule's whole gradient, not of each group's."""
    clipped = [(".*", {"clip_norm": 0.5})]
    sched = FreezingSchedule((Phase(2, rules=TOP1, learning_rate=1.0), Phase(3, rules=clipped, learning_rate=1.0)))
    part = freezing.resolve(sched, clf, optimizer="sgd", weight_decay=0.01).phases[1].partition
    assert sorted(g.label for g in part.groups) == ["g0", "g0-nd", "g0-nd@2", "g0@2"]
    zeros = jax.tree.map(jnp.zeros_like, clf.params)
    updates, _ = part.tx.update(jax.tree.map(jnp.ones_like, clf.params), part.tx.init(zeros), zeros)
    assert float(optax.tree.norm(updates)) == pytest.approx(0.5, rel=1e-5)
    n = tree.count(clf.params)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_allclose(leaf, -0.5 / np.sqrt(n), rtol=1e-5)


def test_rule_clip_in_one_phase_only_carries_state(clf):
    """Regression: a rule clip_norm in the probe phase but not in the fine-tune crashed at the boundary (after the
    probe trained): "cannot carry optimizer state ... its state structure differs". Clipping is stateless; a clip
    that never triggers leaves the run equal to one without it, moments and counts carried (to the last ulp: the
    clip's norm changes XLA's fusion of the probe's program, as in the thawing test above)."""

    def sched(head_rule):
        probe = Phase(2, rules=[("^head/", head_rule), (".*", None)], learning_rate=1e-2, name="probe")
        return FreezingSchedule((probe, Phase(2, rules="full", learning_rate=1e-3, name="ft")))

    clipped, hist = run_schedule(clf, sched({"clip_norm": 1e9}))
    plain, _ = run_schedule(clf, sched("train"))
    assert [h.end for h in hist] == [2, 4]
    assert int(clipped.opt_state.inner_states["g0@2"].inner_state[0].count) == 4  # the head's Adam count carried
    _assert_close(clipped.params, plain.params)
    a, b = P.state_by_param(clipped.opt_state, plain.params), P.state_by_param(plain.opt_state, plain.params)
    assert set(a) == set(b) and len(a) == 2 * len(tree.flatten(plain.params))  # Adam's mu and nu of every leaf
    _assert_close(a, b)  # (that a clip which triggers bounds the rule's update: tests/test_partition.py)


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-12)


def test_cosine_phase_that_is_all_warmup(clf):
    """Regression: warmup_steps equal to the phase's length passed the check, then failed inside optax (zero decay
    steps). Such a phase warms up linearly from 0 toward the peak over its steps."""
    lr = freezing.lr_schedule({"schedule": "cosine", "peak": 1.0, "warmup_steps": 4}, 4)
    assert [float(lr(s)) for s in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    same = freezing.lr_schedule({"schedule": "cosine", "peak": 1.0, "warmup_steps": 4}, 8)  # the general case agrees
    assert [float(same(s)) for s in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    ft_lr = {"schedule": "cosine", "peak": 1e-3, "warmup_steps": 2}
    plan = freezing.resolve(freezing.get("lp_ft", clf, probe_steps=1, ft_steps=2, ft_lr=ft_lr), clf)
    assert [(p.start, p.stop) for p in plan.phases] == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="LR schedule 'cosine': warmup_steps must be a whole number, got 1.5"):
        freezing.lr_schedule({"schedule": "cosine", "peak": 1.0, "warmup_steps": 1.5}, 4)


def test_chain_thaw_final_steps(clf):
    """Regression: final_steps=0 silently became steps_per_stage; None (the default) means steps_per_stage."""
    assert freezing.get("chain_thaw", clf, steps_per_stage=5).lengths()[-1] == 5
    assert freezing.get("chain_thaw", clf, steps_per_stage=5, final_steps=7).lengths()[-1] == 7
    with pytest.raises(ValueError, match="phase 'all' has length 0: every phase needs at least one step"):
        freezing.resolve(freezing.get("chain_thaw", clf, steps_per_stage=5, final_steps=0), clf)


def test_phase_steps_must_be_whole_numbers():
    """Regression: Phase(steps=2.5) was truncated to 2 steps. An integral float (from a config) is accepted."""
    assert Phase(steps=3.0).length(None) == 3 and Phase(steps=3.0) == Phase(steps=3) == Phase(steps=np.int64(3))
    assert type(Phase(steps=np.float32(3.0)).steps) is int
    for bad in (2.5, True, "3"):
        with pytest.raises(ValueError, match=rf"phase 'p': steps must be a whole number, got {bad!r}"):
            Phase(steps=bad, name="p")
    with pytest.raises(ValueError, match="steps must be a whole number, got 2.5"):
        FreezingSchedule.from_config({"phases": [{"steps": 2.5}]})
