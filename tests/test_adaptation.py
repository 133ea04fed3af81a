"""Domain adaptation (tljax.adaptation): the reversal layer and its schedule, MMD and CORAL against NumPy, the
masked source loss, adaptation batches, the domain head wrapper, a DANN fit through engine.fit, config errors."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tljax.models as tm
from tljax import adaptation, engine, freezing, tree
from tljax.adaptation import AdaptationData, job
from tljax.engine import EngineConfig

TINY_BERT = {"model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip


# ---- gradient reversal and its schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize("coeff", [0.0, 0.37, 1.0, 2.5])
def test_gradient_reversal_is_identity_forward_and_flips_the_gradient(coeff):
    x = jax.random.normal(jax.random.key(0), (4, 3))
    w = jax.random.normal(jax.random.key(1), (4, 3))
    np.testing.assert_array_equal(adaptation.gradient_reversal(x, coeff), x)
    grad = jax.grad(lambda x: (adaptation.gradient_reversal(x, coeff) * w).sum())(x)
    np.testing.assert_array_equal(grad, -coeff * w)


def test_gradient_reversal_per_row_coefficients_and_no_gradient_to_the_coefficient():
    x, w = jnp.ones((3, 2)), jnp.arange(6.0).reshape(3, 2)
    c = jnp.array([0.5, 1.0, 2.0])
    g_x, g_c = jax.grad(lambda x, c: (adaptation.gradient_reversal(x, c) * w).sum(), argnums=(0, 1))(x, c)
    np.testing.assert_array_equal(g_x, -c[:, None] * w)
    np.testing.assert_array_equal(g_c, np.zeros(3))


def test_dann_coefficient_schedule():
    f = jax.jit(adaptation.dann_coefficient)
    assert float(f(0.0)) == 0.0
    np.testing.assert_allclose(float(f(1.0)), 2 / (1 + np.exp(-10)) - 1, rtol=1e-6)  # 0.99990920
    assert abs(float(f(1.0)) - 0.99991) < 1e-5
    values = np.asarray(jax.vmap(f)(jnp.linspace(0, 1, 101)))
    assert np.all(np.diff(values) > 0)
    np.testing.assert_allclose(values[50], 2 / (1 + np.exp(-5)) - 1, rtol=1e-6)
    assert float(f(1.7)) == float(f(1.0)) and float(f(-0.3)) == 0.0  # progress is clipped to [0, 1]


# ---- discrepancies against NumPy -----------------------------------------------------------------------------------


def numpy_mmd(xs, xt, kernels=5, mul=2.0):
    """DAN's multi-kernel MMD^2, biased V-statistic, written from the definition with explicit loops over kernels."""
    x = np.concatenate([xs, xt]).astype(np.float64)
    n = len(x)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    base = d2.sum() / (n * n - n)
    k = sum(np.exp(-d2 / (base * mul**i)) for i in range(-(kernels // 2), kernels - kernels // 2))
    ns = len(xs)
    return k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean()


def numpy_coral(xs, xt):
    d = xs.shape[1]
    return ((np.cov(xs, rowvar=False) - np.cov(xt, rowvar=False)) ** 2).sum() / (4 * d * d)


@pytest.fixture
def features():
    rng = np.random.RandomState(0)
    return rng.normal(size=(12, 5)).astype(np.float32), (rng.normal(size=(9, 5)) * 1.5 + 0.7).astype(np.float32)


def test_mmd_matches_numpy(features):
    xs, xt = features
    np.testing.assert_allclose(float(adaptation.mmd(xs, xt)), numpy_mmd(xs, xt), atol=1e-5)
    np.testing.assert_allclose(float(adaptation.mmd(xs, xt, kernels=3, kernel_mul=1.5)),
                               numpy_mmd(xs, xt, 3, 1.5), atol=1e-5)  # fmt: skip
    assert float(adaptation.mmd(xs, xs)) < 1e-6 < float(adaptation.mmd(xs, xt))


def test_coral_matches_numpy(features):
    xs, xt = features
    np.testing.assert_allclose(float(adaptation.coral(xs, xt)), numpy_coral(xs, xt), atol=1e-5)


def test_masked_estimators_do_not_depend_on_row_order(features):
    xs, xt = features
    x, t = np.concatenate([xs, xt]), np.r_[np.zeros(len(xs)), np.ones(len(xt))]
    order = np.random.RandomState(1).permutation(len(x))
    np.testing.assert_allclose(float(adaptation.masked_mmd(x[order], t[order])), numpy_mmd(xs, xt), atol=1e-5)
    np.testing.assert_allclose(float(adaptation.masked_coral(x[order], t[order])), numpy_coral(xs, xt), atol=1e-5)


def test_a_batch_with_one_domain_has_no_discrepancy(features):
    """Regression: with no target (or no source) rows MMD was the source kernel's mean and CORAL the source
    covariance's norm, so the loss pulled the features together; now both are 0 with a zero gradient."""
    xs, _ = features
    for t in (np.zeros(len(xs)), np.ones(len(xs))):
        for loss in (adaptation.masked_mmd, adaptation.masked_coral):
            value, grad = jax.value_and_grad(lambda x, loss=loss, t=t: loss(x, t))(jnp.asarray(xs))
            assert float(value) == 0.0 and not np.asarray(grad).any()
    with pytest.raises(ValueError, match="rows from both domains, got 12 source, 0 target"):
        adaptation.mmd(xs, xs[:0])


def test_mmd_bandwidth_is_not_differentiated(features):
    """The bandwidth is a stop_gradient constant: the gradient equals that of MMD at the fixed bandwidth."""
    xs, xt = features
    x, t = jnp.concatenate([xs, xt]), jnp.r_[jnp.zeros(len(xs)), jnp.ones(len(xt))]
    s = float(adaptation.losses.squared_distances(x).sum() / (len(x) ** 2 - len(x)))
    g = jax.grad(lambda x: adaptation.masked_mmd(x, t))(x)
    g_fixed = jax.grad(lambda x: adaptation.masked_mmd(x, t, bandwidth=s))(x)
    np.testing.assert_allclose(g, g_fixed, atol=1e-6)


# ---- losses and batches --------------------------------------------------------------------------------------------


def test_source_loss_reads_source_rows_only():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    batch = {"labels": np.array([1, 3, 0, 2, 2, 1]), "domain": np.array([0, 0, 0, 1, 1, 1])}
    loss, m = adaptation.adaptation_loss("source_only")({"logits": logits}, batch)
    p = np.exp(logits[:3]) / np.exp(logits[:3]).sum(-1, keepdims=True)
    np.testing.assert_allclose(float(loss), -np.log(p[np.arange(3), [1, 3, 0]]).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), (logits[:3].argmax(-1) == [1, 3, 0]).mean())
    other = {**batch, "labels": np.array([1, 3, 0, 0, 3, 0])}  # other target labels: the same loss
    assert float(adaptation.adaptation_loss("source_only")({"logits": logits}, other)[0]) == float(loss)


def test_dann_loss_adds_weighted_domain_bce():
    logits, dl = np.zeros((4, 3), np.float32), np.array([2.0, -1.0, 0.5, -3.0], np.float32)
    batch = {"labels": np.zeros(4, np.int32), "domain": np.array([0, 0, 1, 1]), "grl_coeff": np.full(4, 0.3)}
    loss, m = adaptation.adaptation_loss("dann", weight=0.5)({"logits": logits, "domain_logits": dl}, batch)
    d = np.array([0, 0, 1, 1])
    bce = np.mean(np.log1p(np.exp(-dl)) * d + np.log1p(np.exp(dl)) * (1 - d))
    np.testing.assert_allclose(float(m["domain_loss"]), bce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.log(3) + 0.5 * bce, rtol=1e-5)
    assert float(m["domain_accuracy"]) == 0.5 and abs(float(m["grl_coeff"]) - 0.3) < 1e-7
    without = {k: v for k, v in batch.items() if k != "grl_coeff"}
    with pytest.raises(ValueError, match="grl_coeff"):
        adaptation.adaptation_loss("dann")({"logits": logits, "domain_logits": dl}, without)


def test_coral_loss_uses_the_features_of_each_domain(features):
    xs, xt = features
    out = {"logits": np.zeros((21, 2), np.float32), "features": np.concatenate([xs, xt])}
    batch = {"labels": np.zeros(21, np.int32), "domain": np.r_[np.zeros(12), np.ones(9)].astype(np.int32)}
    loss, m = adaptation.adaptation_loss("coral", weight=2.0)(out, batch)
    np.testing.assert_allclose(float(m["discrepancy"]), numpy_coral(xs, xt), atol=1e-5)
    np.testing.assert_allclose(float(loss), np.log(2) + 2 * numpy_coral(xs, xt), atol=1e-5)


def token_source(offset: int, seed: int, labelled=True):
    """Batches of 8 rows of 6 tokens from the lower (label 0) or upper (label 1) half of a 40-token window;
    `offset` shifts the window (the target domain uses other tokens)."""

    def data(start):
        for step in itertools.count(start):
            rng = np.random.RandomState(seed * 1000 + step)
            labels = rng.randint(0, 2, 8)
            ids = (offset + 2 + labels[:, None] * 20 + rng.randint(0, 20, (8, 6))).astype(np.int32)
            yield {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

    return data


def test_adaptation_batches_hide_target_labels_and_carry_the_schedule():
    data = AdaptationData(token_source(0, 0), token_source(50, 1), total_steps=10)
    batches = list(itertools.islice(data(0), 6))
    b = batches[4]
    src, tgt = next(token_source(0, 0)(4)), next(token_source(50, 1)(4))
    np.testing.assert_array_equal(b["input_ids"], np.concatenate([src["input_ids"], tgt["input_ids"]]))
    np.testing.assert_array_equal(b["labels"], np.r_[src["labels"], np.zeros(8)])
    np.testing.assert_array_equal(b["domain"], np.r_[np.zeros(8), np.ones(8)])
    np.testing.assert_allclose(b["grl_coeff"], np.full(16, 2 / (1 + np.exp(-4)) - 1), rtol=1e-6)
    resumed = next(data(4))  # train_data(step) restarts both halves and the schedule at `step`
    for k in b:
        np.testing.assert_array_equal(resumed[k], b[k])
    only = next(AdaptationData(token_source(0, 0), None, 10)(0))  # source-only: no target rows at all
    assert len(only["labels"]) == 8 and not only["domain"].any()


def test_text_halves_of_different_lengths_are_padded():
    a = {"input_ids": np.ones((2, 3), np.int32), "attention_mask": np.ones((2, 3), np.int32)}
    b = {"input_ids": np.full((1, 5), 7, np.int32), "attention_mask": np.ones((1, 5), np.int32)}
    out = adaptation.concat_rows(a, b)
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="different keys"):
        adaptation.concat_rows(a, {"input_ids": b["input_ids"]})


# ---- the domain head and a DANN fit --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tm.from_config(TINY_BERT, num_classes=2, pooling="mean", seed=0)


def test_with_domain_head_keeps_backbone_and_head(tiny):
    batch = next(AdaptationData(token_source(0, 0), token_source(50, 1), 10)(0))
    wrapped = adaptation.with_domain_head(tiny, adaptation.DomainClassifier((16,)), batch, seed=3)
    assert set(wrapped.params) == {"backbone", "head", "domain_head"}
    assert jax.tree.map(jnp.shape, wrapped.params["domain_head"]) == {
        "hidden_0": {"bias": (16,), "kernel": (32, 16)}, "out": {"bias": (1,), "kernel": (16, 1)}}  # fmt: skip
    out = wrapped.model.apply({"params": wrapped.params}, **{k: v for k, v in batch.items() if k != "labels"})
    plain = tiny.model.apply({"params": tiny.params}, input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"])  # fmt: skip
    np.testing.assert_array_equal(out["logits"], plain["logits"])
    assert out["domain_logits"].shape == (16,)
    with pytest.raises(ValueError, match="WithHead"):
        adaptation.with_domain_head(dataclasses.replace(tiny, model=tiny.model.backbone), None, batch)


def test_dann_fit_trains_domain_head_and_top_keeps_frozen_params(tiny):
    steps = 40
    data = AdaptationData(token_source(0, 0), token_source(50, 1), total_steps=steps)
    first = next(data(0))
    loaded = adaptation.with_domain_head(tiny, adaptation.DomainClassifier((16,), dropout=0.0), first)
    phase = freezing.Phase(steps=steps, rules="top_k", rule_args={"k": 1}, learning_rate=1e-2)
    schedule = adaptation.train_domain_head(freezing.FreezingSchedule((phase,)), loaded)
    loss_fn = adaptation.adaptation_loss("dann", weight=0.1)
    result = engine.fit(loaded, schedule, data, EngineConfig(progress=False, devices=1), loss_fn=loss_fn)

    fixed = next(data(steps))  # a batch not trained on
    inputs = {k: v for k, v in fixed.items() if k != "labels"}
    ce = lambda p: float(loss_fn(loaded.model.apply({"params": p}, **inputs), fixed)[1]["source_ce"])
    assert ce(result.state.params) < 0.7 * ce(loaded.params)
    before, after = tree.flatten(loaded.params), tree.flatten(jax.device_get(result.state.params))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert {p for p in before if p.startswith("domain_head/")} <= changed
    assert any(p.startswith("head/") for p in changed) and any("layer_1/" in p for p in changed)
    frozen = {p for p in before if p.startswith("backbone/embeddings/") or "layer_0/" in p}
    assert frozen and not frozen & changed
    assert {"source_ce", "domain_loss", "domain_accuracy", "grl_coeff"} <= set(result.history[-1].metrics)


# ---- configs -------------------------------------------------------------------------------------------------------


def test_configs_parse_and_bad_ones_raise():
    from experiments.configs import adapt as configs

    for method in adaptation.METHODS:
        for pair in configs.PAIRS:
            c = configs.get_config(f"{method},{pair}")
            job.check_config(c)
            assert c.adapt.method == method and c.data.pair == pair
    with pytest.raises(ValueError, match="method"):
        configs.get_config("dan")
    with pytest.raises(ValueError, match="pair"):
        configs.get_config("dann,mnist_m")
    c = configs.get_config("dann")
    c.adapt.method = "adda"
    with pytest.raises(ValueError, match="unknown adapt.method 'adda'"):
        job.check_config(c)
    with pytest.raises(ValueError, match="weight must be"):
        adaptation.adaptation_loss("mmd", weight=-1.0)
    with pytest.raises(ValueError, match="unknown adaptation method"):
        adaptation.adaptation_loss("dan")
    with pytest.raises(ValueError, match="domain"):
        adaptation.adaptation_loss("mmd")({"logits": np.zeros((2, 2))}, {"labels": np.zeros(2, np.int32)})


@pytest.mark.parametrize("arg", ["dann", "mmd,wordnet"])
def test_adapt_configs_build_without_training(arg):
    """The real offline data and models (MiniLM-L6 for wordnet), small sizes: batches, domain head and plan."""
    from experiments.configs import adapt as configs

    config = configs.get_config(arg)
    config.data.update(train_size=64, test_size=32, batch_size=8)
    built = job.build(config)
    batch = next(built.train_data(0))
    rows = 8 if config.adapt.method == "source_only" else 16
    np.testing.assert_array_equal(batch["domain"], np.r_[np.zeros(8), np.ones(rows - 8)])
    assert len(batch["labels"]) == rows and batch["grl_coeff"][0] == 0.0
    assert ("domain_head" in built.loaded.params) == (config.adapt.method == "dann")
    assert {len(s) for s in built.splits.values()} == {64, 32} and built.loaded.model.head.num_classes == (
        26 if config.data.pair == "wordnet" else 10)  # fmt: skip
    plan = freezing.resolve(built.schedule, built.loaded, steps_per_epoch=built.train_data.steps_per_epoch)
    assert plan.total_steps == 300 == built.train_data.total_steps
    part = plan.phases[0].partition
    if config.adapt.method == "dann":
        assert part.count("train") == tree.count(built.loaded.params)
    if config.data.pair == "wordnet":  # the bottom four of six blocks frozen
        frozen = {p for p in tree.paths(built.loaded.params) if "layer_3/" in p or "embeddings/" in p}
        trainable = {p for p, t in tree.flatten(part.trainable_mask).items() if t}
        assert frozen and not frozen & trainable and any("layer_5/" in p for p in trainable)


# ---- job.run: preemption and reruns (build, fit and evaluate stubbed: the bookkeeping alone) -----------------------


@pytest.fixture
def fake_fit(monkeypatch):
    """job.run with stand-ins for build, engine.fit and evaluate. Set `fake.status` / `fake.step`; `fake.calls`
    counts fits; a fit writes a checkpoint folder for its step (what a rerun would resume) and records whether
    config.json was already written."""
    from types import SimpleNamespace

    fake = SimpleNamespace(status="completed", step=10, calls=0, config_written=[])

    def build(config, workdir=None):
        return SimpleNamespace(loaded=None, schedule=None, train_data=None, engine_config=None, loss_fn=None,
                               test_data={"source": lambda: None, "target": lambda: None},
                               splits={"source_train": [0] * 4}, workdir=workdir)  # fmt: skip

    def fit(*args, **kwargs):
        fake.calls += 1
        workdir = fake.workdir
        fake.config_written.append((workdir / "config.json").is_file())
        (workdir / "checkpoints" / str(fake.step)).mkdir(parents=True, exist_ok=True)
        state = SimpleNamespace(step=np.int32(fake.step), params=None, collections=None)
        return SimpleNamespace(state=state, status=fake.status, history=[], plan=SimpleNamespace(total_steps=10))

    monkeypatch.setattr(job, "build", build)
    monkeypatch.setattr(job.engine, "fit", fit)
    monkeypatch.setattr(job.evaluation, "evaluate", lambda *a, **k: {"accuracy": 0.5})
    return fake


def adapt_config(**changes):
    from experiments.configs import adapt as configs

    config = configs.get_config("coral")
    for key, value in changes.items():
        *path, last = key.split(".")
        target = config
        for k in path:
            target = target[k]
        target[last] = value
    return config


def test_a_preempted_adapt_run_stops_writes_no_results_and_a_rerun_resumes(fake_fit, tmp_path):
    """Regression: job.run ignored status "preempted": it tested the half-trained model, wrote it to results.json as
    the result (status preempted) and `experiments.adapt` then read that file on every rerun, never resuming."""
    from experiments import adapt as cli_adapt

    fake_fit.workdir = tmp_path / "seed_0"
    fake_fit.status, fake_fit.step = "preempted", 6
    with pytest.raises(SystemExit, match="preempted at step 6: rerun the same command to resume"):
        cli_adapt.run_seed(adapt_config(), 0, tmp_path / "seed_0")
    assert not (tmp_path / "seed_0" / "results.json").exists()
    fake_fit.status, fake_fit.step = "completed", 10
    out = cli_adapt.run_seed(adapt_config(), 0, tmp_path / "seed_0")
    assert fake_fit.calls == 2 and out["status"] == "completed"  # the rerun trained (resumed) again
    assert cli_adapt.run_seed(adapt_config(), 0, tmp_path / "seed_0") == out and fake_fit.calls == 2  # finished


def test_a_preempted_results_json_of_an_earlier_version_is_set_aside_and_resumed(fake_fit, tmp_path):
    """A results.json with status "preempted" (written before the fix) is no result: kept as
    results.preempted.json, and the run resumes from its checkpoint."""
    from experiments import adapt as cli_adapt

    seed_dir = fake_fit.workdir = tmp_path / "seed_0"
    seed_dir.mkdir()
    (seed_dir / "results.json").write_text('{"status": "preempted", "steps": 400, "target_test_accuracy": 0.1}')
    out = cli_adapt.run_seed(adapt_config(), 0, seed_dir)
    assert fake_fit.calls == 1 and out["status"] == "completed"
    assert '"preempted"' in (seed_dir / "results.preempted.json").read_text()


def test_an_adapt_rerun_with_another_config_is_refused(fake_fit, tmp_path):
    """Regression: a rerun in the same workdir with another config reported the old seed results as its own."""
    from experiments import adapt as cli_adapt

    seed_dir = fake_fit.workdir = tmp_path / "seed_0"
    first = cli_adapt.run_seed(adapt_config(), 0, seed_dir)
    assert fake_fit.config_written == [True]  # before training: a checkpoint always has its config beside it
    assert first["config"]["adapt"]["weight"] == 1.0
    changed = adapt_config(**{"adapt.weight": 50.0, "schedule.args.steps": 20})
    with pytest.raises(ValueError, match=r"adapt\.weight, schedule\.args\.steps differ\): use a new --workdir"):
        cli_adapt.run_seed(changed, 0, seed_dir)
    assert cli_adapt.run_seed(adapt_config(name="relabelled"), 0, seed_dir) == first  # the name is a label
    fake_fit.workdir, fake_fit.status = tmp_path / "seed_1", "preempted"  # a checkpoint, no results: still refused
    with pytest.raises(SystemExit):
        cli_adapt.run_seed(adapt_config(), 1, tmp_path / "seed_1")
    with pytest.raises(ValueError, match=r"adapt\.weight differ"):
        cli_adapt.run_seed(adapt_config(**{"adapt.weight": 50.0}), 1, tmp_path / "seed_1")
    assert fake_fit.calls == 2
