"""Partitions: optimizer state only for trainable params, frozen params untouched, per-group LRs, rule errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import token_batch

import tljax.models as tm
from tljax import partition as P
from tljax import rules, tree
from tljax.step import init_state, make_train_step


@pytest.fixture(scope="module")
def clf(tiny_bert_dir):
    return tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="pooler")  # every param gets a gradient


@pytest.fixture(scope="module")
def batch():
    ids, mask = token_batch(4, 8)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 1, 2, 1])}


def _run(loaded, part, batch, steps=3):
    step = jax.jit(make_train_step(loaded.model, part))
    state = init_state(loaded.params, part.tx)
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state, metrics


def _flat_np(params):
    return {p: np.asarray(v) for p, v in tree.flatten(params).items()}


def test_adam_state_holds_exactly_the_trainable_params(clf):
    part = P.build(clf.params, rules.top_k(clf, 1), learning_rate=1e-3, weight_decay=0.01)
    state = part.tx.init(clf.params)
    assert P.state_nbytes(state) == 2 * part.nbytes("train")
    assert part.nbytes(True) + part.nbytes(False) == tree.nbytes(clf.params)
    full = P.build(clf.params, rules.full(clf), learning_rate=1e-3)
    assert P.state_nbytes(full.tx.init(clf.params)) == 2 * tree.nbytes(clf.params)
    probe = P.build(clf.params, rules.linear_probe(clf), learning_rate=1e-3)
    assert P.state_nbytes(probe.tx.init(clf.params)) == 2 * tree.nbytes(clf.params["head"])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_bitwise_unchanged_trainable_changed(clf, batch, optimizer):
    part = P.build(clf.params, rules.top_k(clf, 1), learning_rate=1e-2, optimizer=optimizer)
    # The head is zero-initialised: with a zero head no gradient reaches the backbone, so perturb it first.
    params = jax.tree.map(lambda x: x, clf.params)
    params["head"]["out"]["kernel"] = jnp.full_like(params["head"]["out"]["kernel"], 0.1)
    state, _ = _run(_with(clf, params), part, batch)
    before, after, mask = _flat_np(params), _flat_np(state.params), tree.flatten(part.trainable_mask)
    for path in before:
        if mask[path]:
            assert not np.array_equal(before[path], after[path]), path
        else:
            assert np.array_equal(before[path], after[path]), path


def _with(loaded, params):
    import dataclasses

    return dataclasses.replace(loaded, params=params)


def test_sgd_update_is_minus_group_lr_times_grad(clf, batch):
    rule_list = [(r"^head/", P.train(lr=0.5)), (r"layer_1/", P.train(lr_mult=0.1)), (".*", P.FROZEN)]
    part = P.build(clf.params, rule_list, learning_rate=0.2, optimizer="sgd")
    params = _with(clf, clf.params).params
    params["head"]["out"]["kernel"] = jnp.full_like(params["head"]["out"]["kernel"], 0.1)
    loaded = _with(clf, params)
    state = init_state(params, part.tx)

    def loss(p):
        out = loaded.model.apply(
            {"params": p},
            **{k: v for k, v in batch.items() if k != "labels"},
            train=True,
            rngs={"dropout": jax.random.fold_in(state.rng, 0)},
        )
        return optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["labels"]).mean()

    grads = _flat_np(jax.jit(jax.grad(loss))(params))
    new, _ = jax.jit(make_train_step(loaded.model, part))(state, batch)
    lr_of = {"head": 0.5, "layer_1": 0.2 * 0.1}
    for path, p0 in _flat_np(params).items():
        p1 = np.asarray(tree.flatten(new.params)[path])
        lr = next((v for k, v in lr_of.items() if k in path), 0.0)
        np.testing.assert_allclose(p1 - p0, -np.float32(lr) * grads[path], rtol=1e-5, atol=1e-7, err_msg=path)
        if lr == 0.0:
            assert np.array_equal(p1, p0)


def test_frozen_params_cost_no_backward_flops(tiny_bert_dir, batch):
    # Without dropout: XLA counts the mask hash's integer ops as flops, which swamp a tiny model's matmuls.
    clf = tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="pooler", dropout=0.0, attention_dropout=0.0)

    def flops(rule_list):
        part = P.build(clf.params, rule_list, learning_rate=1e-3)
        state = init_state(clf.params, part.tx)
        compiled = jax.jit(make_train_step(clf.model, part)).lower(state, batch).compile()
        return compiled.cost_analysis()["flops"]

    def forward(params):
        return clf.model.apply(
            {"params": params},
            **{k: v for k, v in batch.items() if k != "labels"},
            train=True,
            rngs={"dropout": jax.random.key(0)},
        )["logits"]

    fwd = jax.jit(forward).lower(clf.params).compile().cost_analysis()["flops"]
    probe, top1, full = flops(rules.linear_probe(clf)), flops(rules.top_k(clf, 1)), flops(rules.full(clf))
    assert probe < 1.15 * fwd  # the backward pass stops at the head
    assert probe < top1 < full
    assert full > 2.0 * fwd


def test_weight_decay_skips_biases_norms_and_frozen(clf):
    part = P.build(clf.params, rules.top_k(clf, 1), learning_rate=1e-3, weight_decay=0.1)
    for g in part.groups:
        if not g.rule.trainable:
            assert g.weight_decay == 0.0
        for path in g.paths:
            if path.endswith("bias") or "norm/" in path:
                assert g.weight_decay == 0.0, path
            elif g.rule.trainable:
                assert g.weight_decay == 0.1, path


def test_summary_lists_groups_and_totals(clf):
    part = P.build(clf.params, rules.linear_probe(clf), learning_rate=1e-3)
    text = part.summary()
    assert "^head/" in text and "frozen" in text
    assert f"trainable {tree.count(clf.params['head']):,} of {tree.count(clf.params):,}" in text
    rows = part.rows()
    assert sum(r["params"] for r in rows) == tree.count(clf.params)


def test_schedules_and_multipliers(clf):
    sched = optax.linear_schedule(1.0, 0.0, 10)
    part = P.build(clf.params, [(r"^head/", P.train(lr_mult=0.5)), (".*", "train")], learning_rate=sched)
    lrs = {g.pattern: g.lr for g in part.groups}
    assert float(lrs["^head/"](4)) == pytest.approx(0.3) and float(lrs[".*"](4)) == pytest.approx(0.6)
    assert "schedule" in part.summary()


def test_uncovered_paths_are_listed(clf):
    with pytest.raises(ValueError, match=r"match no rule: \['backbone/embeddings"):
        P.build(clf.params, [(r"^head/", "train")], learning_rate=1e-3)


def test_regex_matching_nothing_is_an_error(clf):
    with pytest.raises(ValueError, match=r"regex 'encoder/layr_1/' matches no parameter"):
        P.build(clf.params, [(r"encoder/layr_1/", "train"), (".*", "frozen")], learning_rate=1e-3)


def test_shadowed_regex_is_an_error(clf):
    with pytest.raises(ValueError, match=r"only matches parameters already claimed"):
        P.build(clf.params, [(".*", "train"), (r"^head/", "frozen")], learning_rate=1e-3)


def test_unknown_rule_field_and_optimizer(clf):
    with pytest.raises(ValueError, match=r"unknown rule field\(s\) \['lr_multiplier'\]"):
        P.build(clf.params, [(".*", {"lr_multiplier": 2})], learning_rate=1e-3)
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        P.build(clf.params, [(".*", "train")], learning_rate=1e-3, optimizer="adamx")
    with pytest.raises(ValueError, match="unknown rule set"):
        rules.get("linear_prob", clf)


def test_rules_from_config_data(clf):
    part = P.build(clf.params, [("^head/", {"lr_mult": 10.0, "weight_decay": 0.0}), (".*", None)], learning_rate=1e-3)
    assert [(g.pattern, g.rule.trainable, g.lr) for g in part.groups] == [("^head/", True, 1e-2), (".*", False, 1e-3)]


BERT_LLRD = {  # tiny BERT: 2 blocks, depth = 3; multiplier = decay ** (3 - layer_id)
    "backbone/embeddings/": 0.5**3,
    "backbone/encoder/layer_0/": 0.5**2,
    "backbone/encoder/layer_1/": 0.5**1,
    "backbone/pooler/": 1.0,
    "head/": 1.0,
}


def assert_llrd_table(loaded, table, decay=0.5):
    """Every parameter's LR under `rules.llrd` equals the table entry of its path prefix; every entry is used."""
    part = P.build(loaded.params, rules.llrd(loaded, decay), learning_rate=1.0)
    seen = set()
    for g in part.groups:
        for path in g.paths:
            prefix = next(p for p in table if path.startswith(p))
            assert g.lr == pytest.approx(table[prefix]), path
            seen.add(prefix)
    assert seen == set(table)


def test_llrd_bert_table(clf):
    assert_llrd_table(clf, BERT_LLRD)


def test_llrd_matches_family_layer_id(clf):
    n = clf.family.num_layers(clf.hf_config)
    part = P.build(clf.params, rules.llrd(clf, 0.8), learning_rate=1.0)
    for g in part.groups:
        for path in g.paths:
            depth = 0 if path.startswith("head/") else None
            lid = n + 1 if depth == 0 else clf.family.layer_id(path.removeprefix("backbone/"), n)
            assert g.lr == pytest.approx(0.8 ** (n + 1 - lid)), path


@pytest.mark.parametrize(
    "name,kwargs,trainable_prefixes",
    [
        ("linear_probe", {}, ["head/"]),
        (
            "full",
            {},
            [
                "head/",
                "backbone/embeddings/",
                "backbone/encoder/layer_0/",
                "backbone/encoder/layer_1/",
                "backbone/pooler/",
            ],
        ),
        ("top_k", {"k": 1}, ["head/", "backbone/encoder/layer_1/", "backbone/pooler/"]),
        ("surgical", {"block": 0}, ["head/", "backbone/encoder/layer_0/"]),
        ("embeddings_frozen", {}, ["head/", "backbone/encoder/", "backbone/pooler/"]),
    ],
)
def test_rule_set_trainable_table(clf, name, kwargs, trainable_prefixes):
    part = P.build(clf.params, rules.get(name, clf, **kwargs), learning_rate=1e-3)
    for path, t in tree.flatten(part.trainable_mask).items():
        assert t == any(path.startswith(p) for p in trainable_prefixes), path


def test_bitfit_and_norm_only(clf):
    for name, keep in [("bitfit", lambda p: p.endswith("bias")), ("norm_only", lambda p: "norm/" in p)]:
        part = P.build(clf.params, rules.get(name, clf), learning_rate=1e-3)
        for path, t in tree.flatten(part.trainable_mask).items():
            assert t == (path.startswith("head/") or keep(path)), (name, path)


def test_step_forwards_frozen_params_untouched(clf, batch):
    """Regression: frozen leaves used to come out of the step as `p + 0` (a copy of every frozen weight per step:
    3.5x slower head-only steps); now the jaxpr returns their input buffers as they are."""
    part = P.build(clf.params, rules.linear_probe(clf), learning_rate=1e-3)
    state = init_state(clf.params, part.tx)
    closed = jax.make_jaxpr(make_train_step(clf.model, part))(state, batch)
    n_in = len(jax.tree.leaves(state))
    in_params = closed.jaxpr.invars[1 : 1 + len(jax.tree.leaves(state.params))]  # after the step counter
    out_params = closed.jaxpr.outvars[1 : 1 + len(in_params)]
    assert len(closed.jaxpr.invars) >= n_in
    for mask, vin, vout in zip(jax.tree.leaves(part.trainable_mask), in_params, out_params, strict=True):
        assert (vin is vout) == (not mask)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16, patch_size=8
    )
    folder = tmp_path_factory.mktemp("vit")
    ViTModel(cfg).save_pretrained(folder)
    return tm.load_pretrained(folder, num_classes=3)


VIT_LLRD = {  # tiny ViT: 2 blocks, depth = 3; multiplier = decay ** (3 - layer_id)
    "backbone/embeddings/cls_token": 0.5**3,
    "backbone/embeddings/position_embeddings": 0.5**3,
    "backbone/embeddings/patch_embeddings/": 0.5**3,
    "backbone/encoder/layer_0/": 0.5**2,
    "backbone/encoder/layer_1/": 0.5**1,
    "backbone/final_norm/": 1.0,
    "backbone/pooler/": 1.0,
    "head/": 1.0,
}


def test_llrd_vit_table(tiny_vit):
    assert_llrd_table(tiny_vit, VIT_LLRD)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"learning_rate": -1e-3}, "learning_rate must be a finite number >= 0, got -0.001"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number >= 0, got nan"),
        ({"learning_rate": "1e-3"}, "learning_rate must be a finite number >= 0, got '1e-3'"),
        ({"learning_rate": 1e-3, "weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"learning_rate": 1e-3, "clip_norm": 0.0}, "clip_norm must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_learning_rates_and_strengths_are_errors(clf, kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.build(clf.params, rules.full(clf), **kwargs)


def test_bad_rule_fields_and_regexes_are_errors(clf):
    with pytest.raises(ValueError, match="lr_mult must be a finite number >= 0, got -1"):
        P.build(clf.params, [(".*", {"lr_mult": -1})], learning_rate=1e-3)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        P.train(lr=float("nan"))
    with pytest.raises(ValueError, match=r"rule 1: invalid regex 'layer_\[1': unterminated character set"):
        P.build(clf.params, [("^head/", "train"), ("layer_[1", "train"), (".*", None)], learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"no_decay: invalid regex '\(bias'"):
        P.build(clf.params, rules.full(clf), learning_rate=1e-3, no_decay=["(bias"])


def _ones_update(part, params):
    """The update `part.tx` makes from a fresh state for an all-ones gradient at all-zero parameters (so weight
    decay adds nothing and SGD at LR 1 returns minus the clipped gradient)."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = part.tx.update(ones, part.tx.init(zeros), zeros)
    return tree.flatten(updates)


@pytest.mark.parametrize("ages", [None, {"head/out/kernel": 3, "head/out/bias": 3}], ids=["one_phase", "aged"])
def test_rule_clip_norm_bounds_the_rules_joint_gradient(clf, ages):
    """Regression: with weight decay on (and across phases, by age) a rule's parameters fall into several optax
    groups, and each was clipped on its own: the rule's clipped gradient had norm sqrt(#groups) * clip_norm."""
    rule_list = [(r"encoder/", P.train(clip_norm=0.5)), (".*", P.train())]
    part = P.build(clf.params, rule_list, learning_rate=1.0, optimizer="sgd", weight_decay=0.01, ages=ages)
    assert {g.label for g in part.groups if g.pattern == "encoder/"} == {"g0", "g0-nd"}  # split by decay
    assert len([g for g in part.groups if g.pattern == ".*"]) == (2 if ages is None else 4)  # and by age
    updates = _ones_update(part, clf.params)
    clipped = {p: u for p, u in updates.items() if "encoder/" in p}
    n = sum(u.size for u in clipped.values())
    assert float(optax.tree.norm(clipped)) == pytest.approx(0.5, rel=1e-5)
    for path, u in clipped.items():  # one scale for the whole rule: the direction is kept
        np.testing.assert_allclose(u, -0.5 / np.sqrt(n), rtol=1e-5, err_msg=path)
    for path, u in updates.items():  # the unclipped rule's gradient passes untouched
        if "encoder/" not in path:
            assert np.all(np.asarray(u) == -1.0), path


def test_rule_clip_norm_adds_no_optimizer_state(clf):
    """Clipping is stateless: a rule's clip_norm leaves the optimizer state's structure as it was, so state
    carries between phases that clip and phases that do not."""
    plain = P.build(clf.params, [(r"^head/", P.train()), (".*", P.FROZEN)], learning_rate=1e-3, weight_decay=0.01)
    clipped = P.build(
        clf.params, [(r"^head/", P.train(clip_norm=1.0)), (".*", P.FROZEN)], learning_rate=1e-3, weight_decay=0.01
    )
    assert jax.tree.structure(plain.tx.init(clf.params)) == jax.tree.structure(clipped.tx.init(clf.params))


def test_weight_decay_conventions_sgd_coupled_adamw_decoupled():
    """SGD adds wd * w to the gradient before momentum (torch.optim.SGD's L2, what ResNet recipes' wd means);
    AdamW decays decoupled from the moments (w -= lr * wd * w each step). Zero task gradients, 10 steps."""
    params = {"w": jnp.ones((1,))}
    zero = {"w": jnp.zeros((1,))}

    def run(optimizer, **kw):
        part = P.build(params, [(".*", P.train())], learning_rate=0.1, optimizer=optimizer, weight_decay=0.1, **kw)
        state, p = part.tx.init(params), params
        for _ in range(10):
            u, state = part.tx.update(zero, state, p)
            p = optax.apply_updates(p, u)
        return float(p["w"][0])

    w, m = 1.0, 0.0
    for _ in range(10):  # by hand: g = 0 + wd * w; m = momentum * m + g; w -= lr * m
        m = 0.9 * m + 0.1 * w
        w -= 0.1 * m
    assert w == pytest.approx(0.621079, abs=1e-6)
    assert run("sgd", momentum=0.9) == pytest.approx(w, rel=1e-6)
    assert run("sgd") == pytest.approx((1 - 0.1 * 0.1) ** 10, rel=1e-6)  # no momentum: L2 = decoupled at lr * wd
    assert run("adamw") == pytest.approx((1 - 0.1 * 0.1) ** 10, rel=1e-6)  # Adam's direction of a zero gradient is 0


def test_rule_with_both_lr_and_lr_mult_is_an_error(clf):
    """Regression: `train(lr=0.1, lr_mult=10)` trained at 0.1, silently dropping the multiplier."""
    with pytest.raises(ValueError, match=r"give one of lr \(absolute\) or lr_mult .*got lr=0.1 and lr_mult=10"):
        P.train(lr=0.1, lr_mult=10)
    with pytest.raises(ValueError, match="give one of lr"):
        P.build(clf.params, [(".*", {"lr": 0.1, "lr_mult": 10.0})], learning_rate=1.0)
    assert P.build(clf.params, [(".*", P.train(lr=0.1))], learning_rate=1.0).groups[0].lr == 0.1


def test_whole_number_arguments_accept_integral_floats(clf):
    """Configs and sweeps pass 1.0 for 1: accepted; 1.5 (or a bool, a string) is an error naming the argument."""
    assert rules.top_k(clf, 1.0) == rules.top_k(clf, 1)
    assert rules.surgical(clf, 1.0) == rules.surgical(clf, 1)
    for bad in (1.5, True, "1"):
        with pytest.raises(ValueError, match=rf"top_k: k must be a whole number, got {bad!r}"):
            rules.top_k(clf, bad)
    with pytest.raises(ValueError, match="surgical: block must be a whole number, got 0.5"):
        rules.surgical(clf, 0.5)
