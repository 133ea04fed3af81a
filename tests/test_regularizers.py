"""Regularisers toward the starting model: L2-SP's and DELTA's gradients, the step with and without them, the engine
with a resumed L2-SP run (and other layouts when there are devices), DELTA's channel attention, and config errors."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import token_batch
from engine_driver import global_batch, make_model, preempted

import tljax.models as tm
from tljax import engine, freezing, multiseed, regularizers, rules, tree
from tljax import partition as P
from tljax.engine import EngineConfig
from tljax.losses import model_inputs
from tljax.prefix_cache import PrefixCache
from tljax.step import init_state, make_train_step

pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests and runs share step programs: compile once


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("reg_model"))
    make_model(folder)  # dropout off: the fine-tuned and the starting model agree at the start
    return tm.load_pretrained(folder, num_classes=3, pooling="mean")


def perturbed(params, scale=0.1, seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype), params)


def flat_np(params) -> dict:
    return {p: np.asarray(v) for p, v in tree.flatten(params).items()}


def copies(x):
    return jax.tree.map(jnp.copy, x)


# --- L2-SP ---


def test_l2_sp_gradient_pulls_transferred_weights_to_the_start_and_the_head_to_zero(loaded):
    reg = regularizers.l2_sp(loaded, alpha=0.3, beta=0.7)
    w0, w = loaded.params, perturbed(loaded.params)
    start = regularizers.anchor(reg, w0)["params"]
    assert not any(p.startswith("head/") for p in start) and len(start) == len(tree.flatten(w0)) - 2
    value, grads = jax.jit(jax.value_and_grad(lambda p: regularizers.l2_sp_penalty(reg.strengths, p, start)))(w)
    f0, f, g = flat_np(w0), flat_np(w), flat_np(grads)
    want = {p: 0.7 * f[p] if p.startswith("head/") else 0.3 * (f[p] - f0[p]) for p in f}
    for p in f:
        np.testing.assert_allclose(g[p], want[p], atol=1e-6, rtol=1e-6, err_msg=p)
    expected = sum(0.5 * np.sum(want[p].astype(np.float64) ** 2) / (0.7 if p.startswith("head/") else 0.3) for p in f)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_l2_sp_rules_set_strengths_per_group_and_frozen_leaves_cost_nothing(loaded):
    reg = regularizers.l2_sp(
        loaded,
        rules=[("^head/", {"beta": 0.5}), ("layer_0/", {"alpha": 2.0}), ("pooler/", None), (".*", {"alpha": 0.1})],
    )
    w0, w = loaded.params, perturbed(loaded.params)
    start = regularizers.anchor(reg, w0)["params"]
    assert not any("pooler/" in p for p in start)
    frozen_out = tree.map_with_path(lambda p, x: None if "layer_1/" in p else x, w)  # layer_1 frozen
    grads = tree.flatten(jax.jit(jax.grad(lambda p: regularizers.l2_sp_penalty(reg.strengths, p, start)))(frozen_out))
    f0, f = flat_np(w0), flat_np(w)
    assert all(g is None for p, g in grads.items() if "layer_1/" in p)
    for p, g in grads.items():
        if g is None:
            continue
        alpha = 0.0 if "pooler/" in p else 2.0 if "layer_0/" in p else 0.1
        want = 0.5 * f[p] if p.startswith("head/") else alpha * (f[p] - f0[p])
        np.testing.assert_allclose(np.asarray(g), want, atol=1e-6, rtol=1e-6, err_msg=p)


# --- DELTA ---


def delta_penalty(loaded, reg, params, w0, batch):
    """DELTA between `params` (everything trains) and the starting `w0`, as the step computes it."""
    anchor = regularizers.anchor(reg, w0, loaded.state)
    nothing_frozen = jax.tree.map(lambda _: None, params)
    reference = reg.reference(loaded.model, nothing_frozen, anchor, batch)
    with reg.capture() as seen:
        loaded.model.apply({"params": params}, **model_inputs(batch), train=False)
    return reg.penalty(params, anchor, seen, reference, batch)


@pytest.fixture(scope="module")
def ragged():
    ids, mask = token_batch(4, 8)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 1, 2, 0])}


def test_delta_is_zero_at_the_start_and_its_gradient_reaches_the_fine_tuned_side_only(loaded, ragged):
    reg = regularizers.delta(loaded, alpha=1.0)
    w0, w = loaded.params, perturbed(loaded.params, 0.05)
    value_and_grads = jax.jit(jax.value_and_grad(lambda p, a: delta_penalty(loaded, reg, p, a, ragged), (0, 1)))
    assert float(value_and_grads(w0, w0)[0]) < 1e-9  # the two forward passes differ only in rounding
    value, (grads, to_start) = value_and_grads(w, w0)
    assert float(value) > 1e-3
    assert all(not g.any() for g in flat_np(to_start).values())  # the starting model is under stop_gradient
    grads = flat_np(grads)
    assert not any(g.any() for p, g in grads.items() if p.startswith(("head/", "backbone/pooler/")))
    assert np.abs(grads["backbone/encoder/layer_1/mlp/fc2/kernel"]).max() > 0
    blocks = regularizers.delta(loaded, layers=[0, -1]).blocks
    assert blocks == ("^backbone/encoder/layer_0/", "^backbone/encoder/layer_1/")


def test_delta_distance_ignores_padding_and_weighs_channels():
    f0 = jnp.zeros((2, 3, 4))
    f = f0.at[1, 2].set(5.0)  # differs only at a padded position
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    assert float(regularizers.feature_distance(f, f0, attention_mask=mask)) == 0.0
    f = f0.at[0, :, 1].set(1.0)  # channel 1 of example 0 moves by 1 at every position
    assert float(regularizers.feature_distance(f, f0)) == pytest.approx(0.5)
    assert float(regularizers.feature_distance(f, f0, weights=(1.0, 3.0, 0.0, 0.0))) == pytest.approx(1.5)


def test_channel_attention_is_uniform_with_a_zero_head_and_not_with_a_trained_one(loaded):
    batches = [global_batch(0), global_batch(1)]
    zero_head = regularizers.channel_attention(loaded, batches, layers=[-1])
    assert len(zero_head) == 1 and len(zero_head[0]) == 32
    np.testing.assert_allclose(zero_head[0], 1.0, atol=1e-6)  # tljax heads start at zero: no channel matters
    trained = perturbed(loaded.params, 0.5, seed=1)
    weights = regularizers.channel_attention(loaded, batches, params=trained)
    assert len(weights) == 2 and np.mean(weights[0]) == pytest.approx(1.0) and np.std(weights[0]) > 1e-4
    assert regularizers.delta(loaded, channel_weights=weights).channel_weights == weights


# --- the step ---


def sgd_part(loaded, lr=0.1):
    return P.build(loaded.params, rules.full(loaded), learning_rate=lr, optimizer="sgd")


def run(loaded, part, reg=None, steps=2, state=None, **kw):
    step = jax.jit(make_train_step(loaded.model, part, regularizer=reg, **kw))
    if state is None:
        anchor = None if reg is None else copies(regularizers.anchor(reg, loaded.params, loaded.state))
        state = init_state(copies(loaded.params), part.tx, loaded.state, anchor=anchor)
    metrics = []
    for s in range(steps):
        state, m = step(state, global_batch(s))
        metrics.append(jax.device_get(m))
    return state, metrics


def test_zero_strengths_equal_no_regularizer_bitwise(loaded):
    part = sgd_part(loaded)
    plain, m_plain = run(loaded, part)
    zero, m_zero = run(loaded, part, regularizers.l2_sp(loaded, alpha=0.0, beta=0.0))
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(zero.params), strict=True):
        assert np.array_equal(a, b)
    assert [m["loss"] for m in m_plain] == [m["loss"] for m in m_zero] and m_zero[-1]["reg_loss"] == 0.0
    assert "reg_loss" not in m_plain[-1]


def test_l2_sp_step_adds_the_penalty_gradient_to_the_task_gradient(loaded):
    """From a state one step away from the start (so w != w0 and the head is not zero), SGD with L2-SP moves every
    parameter by -lr * (alpha (w - w0)) (transferred) or -lr * beta * w (head) more than SGD without it."""
    part, lr, alpha, beta = sgd_part(loaded), 0.1, 0.3, 0.7
    reg = regularizers.l2_sp(loaded, alpha=alpha, beta=beta)
    moved, _ = run(loaded, part, steps=1)
    anchor = copies(regularizers.anchor(reg, loaded.params))
    plain, _ = run(loaded, part, steps=1, state=moved)
    with_reg, metrics = run(loaded, part, reg, steps=1, state=moved.replace(anchor=anchor))
    f0, f1, a, b = (flat_np(x) for x in (loaded.params, moved.params, plain.params, with_reg.params))
    for p in f1:
        pull = beta * f1[p] if p.startswith("head/") else alpha * (f1[p] - f0[p])
        np.testing.assert_allclose(b[p] - a[p], -lr * pull, atol=1e-6, err_msg=p)
    penalty = regularizers.l2_sp_penalty(reg.strengths, moved.params, anchor["params"])
    assert metrics[0]["reg_loss"] == pytest.approx(float(penalty)) and penalty > 0


def test_accumulation_with_l2_sp_matches_the_full_batch(loaded):
    """SGD: Adam would blow up float noise in gradients that are zero in exact arithmetic (attention key biases)."""
    part, reg = sgd_part(loaded), regularizers.l2_sp(loaded, alpha=0.3, beta=0.7)
    full, m_full = run(loaded, part, reg, steps=3)
    split, m_split = run(loaded, part, reg, steps=3, accumulate=2)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(split.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)
    assert m_full[-1]["reg_loss"] == pytest.approx(m_split[-1]["reg_loss"], rel=1e-5)


def test_the_anchor_is_a_step_input_not_a_constant(loaded):
    part = sgd_part(loaded)
    reg = regularizers.l2_sp(loaded)
    state = init_state(loaded.params, part.tx, anchor=regularizers.anchor(reg, loaded.params))
    lowered = jax.jit(make_train_step(loaded.model, part, regularizer=reg)).lower(state, global_batch(0))
    assert len(jax.tree.leaves(state.anchor)) > 10  # w0 of every transferred parameter, as step inputs
    big = [line for line in lowered.as_text().splitlines() if "stablehlo.constant" in line and "99x32" in line]
    assert not big  # the word embeddings' w0 would show up as a (99, 32) constant


# --- the engine ---


def lp_ft(loaded, steps=6):
    return freezing.get("lp_ft", loaded, probe_steps=steps // 2, ft_steps=steps - steps // 2, probe_lr=1e-2, ft_lr=1e-2)


def data(start):
    for step in itertools.count(start):
        yield global_batch(step)


def fit(loaded, workdir, source=data, **kw):
    """The 6-step LP-FT every engine test here runs: the probe trains the head, the fine-tune everything. SGD:
    Adam would turn float noise in gradients that are zero in exact arithmetic (attention key biases) into steps
    that differ between layouts."""
    cfg = {"workdir": workdir, "devices": 1, "progress": False, "tensorboard": False, "log_every": 1,
           "checkpoint": {"every": 2}, "optimizer": {"optimizer": "sgd", "momentum": 0.9}, **kw}  # fmt: skip
    return engine.fit(loaded, lp_ft(loaded), source, EngineConfig.from_config(cfg))


L2SP_CONFIG = {"name": "l2_sp", "alpha": 1.0, "beta": 1.0}


@pytest.fixture(scope="module")
def reference(loaded, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("l2sp") / "run"
    return fit(loaded, str(workdir), regularizer=L2SP_CONFIG), workdir


def train_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_engine_resumes_an_l2_sp_run_exactly(loaded, reference, tmp_path, compilation_cache):
    ref, ref_dir = reference
    assert ref.state.anchor is None and ref.history[-1].metrics["reg_loss"] > 0
    first = fit(loaded, str(tmp_path / "r"), preempted(4), regularizer=L2SP_CONFIG)
    assert first.status == "preempted" and int(first.state.step) == 4
    resumed = fit(loaded, str(tmp_path / "r"), regularizer=L2SP_CONFIG)
    assert int(resumed.state.step) == 6 and resumed.history[0].start == 4
    for a, b in zip(jax.tree.leaves(ref.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert train_rows(tmp_path / "r")[6]["reg_loss"] == train_rows(ref_dir)[6]["reg_loss"]
    restored = engine.restore_state(loaded, ref.plan, ref_dir, 6)  # checkpoints hold no anchor
    assert restored.anchor is None and np.array_equal(restored.params["head"]["out"]["kernel"],
                                                      ref.state.params["head"]["out"]["kernel"])  # fmt: skip


def test_engine_trains_with_delta(loaded):
    cfg = EngineConfig(devices=1, progress=False, regularizer={"name": "delta", "alpha": 1.0, "layers": [-1]})
    result = engine.fit(loaded, freezing.full(loaded, 3, lr=1e-2), data, cfg)  # step 1 moves the zero head only
    assert result.status == "completed" and result.history[-1].metrics["reg_loss"] > 0


def test_seeds_in_one_program_match_the_engine(loaded, reference):
    ref, _ = reference
    optimizer = {"optimizer": "sgd", "momentum": 0.9}
    seeds = multiseed.fit_seeds(loaded, lp_ft(loaded), lambda seed: data, (0, 1), optimizer=optimizer,
                                regularizer=L2SP_CONFIG)  # fmt: skip
    for k in (0, 1):
        for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(seeds.params(k)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert seeds.metrics["reg_loss"].shape == (2, 6) and (seeds.metrics["reg_loss"][:, -1] > 0).all()


@pytest.mark.skipif(jax.device_count() < 2, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
@pytest.mark.parametrize("mode,kw", [("fsdp", {"fsdp_min_size": 0}), ("pmap", {})])
def test_other_layouts_match_one_device(loaded, reference, tmp_path, mode, kw):
    ref, _ = reference
    result = fit(loaded, str(tmp_path / mode), regularizer=L2SP_CONFIG, parallel=mode, devices=None, **kw)
    for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# --- errors ---


def test_bad_configs_are_clear_errors(loaded):
    with pytest.raises(ValueError, match="unknown regularizer name 'l3_sp'"):
        regularizers.from_config(loaded, {"name": "l3_sp"})
    with pytest.raises(ValueError, match="l2_sp alpha must be a finite number >= 0, got -1"):
        EngineConfig.from_config({"regularizer": {"name": "l2_sp", "alpha": -1}})
    with pytest.raises(ValueError, match=r"unknown delta regularizer key\(s\) \['beta'\]"):
        EngineConfig(regularizer={"name": "delta", "beta": 0.1})
    with pytest.raises(ValueError, match="regex '\\^nothing/' matches no parameter"):
        regularizers.l2_sp(loaded, rules=[("^nothing/", {"alpha": 1.0}), (".*", {"alpha": 0.1})])
    with pytest.raises(ValueError, match="match no rule"):
        regularizers.l2_sp(loaded, rules=[("^head/", {"beta": 1.0})])
    with pytest.raises(ValueError, match="a strength is"):
        regularizers.l2_sp(loaded, rules=[(".*", {"gamma": 1.0})])
    with pytest.raises(ValueError, match="not both"):
        regularizers.l2_sp(loaded, alpha=0.1, rules=[(".*", None)])
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        regularizers.delta(loaded, layers=[5])
    with pytest.raises(ValueError, match="frozen-prefix cache"):
        EngineConfig(regularizer={"name": "delta"}, prefix_cache=PrefixCache())
    EngineConfig(regularizer=L2SP_CONFIG, prefix_cache=PrefixCache())  # L2-SP works with the cache


def test_step_errors(loaded):
    part = sgd_part(loaded)
    with pytest.raises(ValueError, match="frozen-prefix cache"):
        block, reg = "^backbone/encoder/layer_0/", regularizers.delta(loaded)
        make_train_step(loaded.model, part, prefix_block=block, regularizer=reg)
    step = make_train_step(loaded.model, part, regularizer=regularizers.l2_sp(loaded))
    with pytest.raises(ValueError, match="state.anchor, which is None"):
        step(init_state(loaded.params, part.tx), global_batch(0))
