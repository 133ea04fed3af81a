"""Multi-task learning: per-head loss weights, gradients through the shared backbone, uncertainty weighting, the
mixed-batch sampler (ratios, determinism, resume), freezing schedules on the shared backbone, per-head evaluation,
errors, and the experiment config."""

import dataclasses
import functools
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import token_batch

import tljax.models as tm
from tljax import engine, freezing, multitask, tree
from tljax.engine import EngineConfig
from tljax.freezing import FreezingSchedule, Phase

TASKS = {"a": 3, "b": 2}


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_ce(logits, labels):
    """Reference mean cross-entropy over the rows with a label (>= 0)."""
    rows = labels >= 0
    return float(-log_softmax(logits)[rows, labels[rows]].mean()) if rows.any() else 0.0


@pytest.fixture(scope="module")
def mt(tiny_bert_dir):
    """A two-head multi-task tiny BERT with uncertainty weights and non-zero heads (so gradients reach the
    backbone), log-variances set away from 0."""
    loaded = multitask.load(tiny_bert_dir, TASKS, uncertainty=True, pooling="mean")
    params = jax.tree.map(jnp.asarray, loaded.params)
    for i, t in enumerate(TASKS):
        k = params["head"][f"heads_{t}"]["out"]["kernel"]
        params["head"][f"heads_{t}"]["out"]["kernel"] = jax.random.normal(jax.random.key(i), k.shape) * 0.5
    params["head"]["task_weights"] = {"a": jnp.float32(0.5), "b": jnp.float32(-0.3)}
    return dataclasses.replace(loaded, params=params)


def make_batch(n=6, length=8, seed=0):
    ids, mask = token_batch(n, length, seed=seed)
    labels = np.full((n, 2), -1, np.int32)
    labels[: n // 2, 0] = np.arange(n // 2) % 3  # the first half belongs to task a
    labels[n // 2 :, 1] = np.arange(n - n // 2) % 2  # the rest to task b
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def outputs_of(loaded, params, batch):
    return _apply(loaded.model, params, batch["input_ids"], batch["attention_mask"])


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, input_ids, attention_mask):
    return model.apply({"params": params}, input_ids=input_ids, attention_mask=attention_mask)


def test_params_layout_and_outputs(mt):
    paths = tree.paths(mt.params)
    assert {"head/task_weights/a", "head/task_weights/b"} <= set(paths)
    assert any(p.startswith("head/heads_a/") for p in paths) and any(p.startswith("head/heads_b/") for p in paths)
    out = outputs_of(mt, mt.params, make_batch())
    assert out["logits"]["a"].shape == (6, 3) and out["logits"]["b"].shape == (6, 2)
    assert float(out["log_vars"]["a"]) == 0.5 and hash(mt.model)  # hashable: the engine caches per model


def test_a_model_built_from_a_config_has_its_log_variances():
    """Regression: `tm.from_config(head=heads_for(..., uncertainty=True))` initialised the heads through `WithHead`,
    which never asked for the log-variances, so the first `MultiTaskModel` call failed (ScopeParamNotFoundError)."""
    cfg = {"model_type": "bert", "vocab_size": 99, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 16}  # fmt: skip
    loaded = multitask.as_multitask(tm.from_config(cfg, head=multitask.heads_for(TASKS, uncertainty=True)))
    assert multitask.log_variances(loaded.params) == {"a": 0.0, "b": 0.0}
    assert set(outputs_of(loaded, loaded.params, make_batch())["log_vars"]) == {"a", "b"}


def test_fixed_weights_apply_per_head(mt):
    batch = make_batch()
    out = outputs_of(mt, mt.params, batch)
    loss_fn = multitask.MultiTaskLoss(("a", "b"), weights={"a": 0.3, "b": 2.0})
    total, metrics = loss_fn(out, batch)
    la = mean_ce(out["logits"]["a"], batch["labels"][:, 0])
    lb = mean_ce(out["logits"]["b"], batch["labels"][:, 1])
    np.testing.assert_allclose(float(total), 0.3 * la + 2.0 * lb, rtol=1e-5)
    np.testing.assert_allclose([float(metrics["loss_a"]), float(metrics["loss_b"])], [la, lb], rtol=1e-5)
    preds_a = np.asarray(out["logits"]["a"]).argmax(-1)[:3]
    assert float(metrics["accuracy_a"]) == pytest.approx((preds_a == batch["labels"][:3, 0]).mean())
    assert float(metrics["rows_a"]) == 0.5
    unweighted, _ = multitask.MultiTaskLoss(("a", "b"))(out, batch)
    np.testing.assert_allclose(float(unweighted), la + lb, rtol=1e-5)


def test_each_head_trains_the_shared_backbone_and_not_the_other_head(mt):
    batch = make_batch()
    only_a = {**batch, "labels": np.where(np.arange(2) == 0, batch["labels"], -1).astype(np.int32)}
    loss_fn = multitask.MultiTaskLoss(("a", "b"))
    grads = jax.grad(lambda p: loss_fn(outputs_of(mt, p, only_a), only_a)[0])(mt.params)
    norm = lambda t: float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(t)))
    assert norm(grads["backbone"]["encoder"]) > 1e-6 and norm(grads["head"]["heads_a"]) > 1e-6
    assert norm(grads["head"]["heads_b"]) == 0.0


def test_uncertainty_weighting_value_and_gradient(mt):
    batch = make_batch()
    loss_fn = multitask.MultiTaskLoss(("a", "b"), uncertainty=True)
    out = outputs_of(mt, mt.params, batch)
    la = mean_ce(out["logits"]["a"], batch["labels"][:, 0])
    lb = mean_ce(out["logits"]["b"], batch["labels"][:, 1])
    total, metrics = loss_fn(out, batch)
    expected = np.exp(-0.5) * la + 0.5 + np.exp(0.3) * lb - 0.3
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert float(metrics["log_var_b"]) == pytest.approx(-0.3)
    grads = jax.grad(lambda p: loss_fn(outputs_of(mt, p, batch), batch)[0])(mt.params)["head"]["task_weights"]
    # d/ds [exp(-s) L + s] = 1 - exp(-s) L
    np.testing.assert_allclose(float(grads["a"]), 1 - np.exp(-0.5) * la, rtol=1e-4)
    np.testing.assert_allclose(float(grads["b"]), 1 - np.exp(0.3) * lb, rtol=1e-4)
    absent = {**batch, "labels": np.where(np.arange(2) == 0, batch["labels"], -1).astype(np.int32)}
    total, _ = loss_fn(outputs_of(mt, mt.params, absent), absent)  # task b has no rows: no s_b term
    np.testing.assert_allclose(float(total), np.exp(-0.5) * la + 0.5, rtol=1e-5)


def test_mixing_rates():
    sizes = {"big": 900, "small": 100}
    assert multitask.mixing_rates(sizes) == pytest.approx({"big": 0.9, "small": 0.1})
    assert multitask.mixing_rates(sizes, "temperature", temperature=2.0) == pytest.approx({"big": 0.75, "small": 0.25})
    uniform = multitask.mixing_rates(sizes, "temperature", temperature=1e6)
    assert uniform["small"] == pytest.approx(0.5, abs=1e-5)
    assert multitask.mixing_rates(sizes, "explicit", weights={"big": 1, "small": 3}) == {"big": 0.25, "small": 0.75}


def records(n, offset):
    return [{"x": np.array([offset + i], np.int32), "label": i % 3} for i in range(n)]


def mixed(seed=0, rates=None, batch_size=64):
    splits = {"a": records(50, 0), "b": records(30, 1000)}
    return multitask.MixedTrainData(splits, rates or {"a": 0.7, "b": 0.3}, batch_size=batch_size, seed=seed)


def test_sampler_follows_ratio_and_keeps_labels_apart():
    data = mixed()
    batches = list(itertools.islice(data(0), 200))
    labels = np.concatenate([b["labels"] for b in batches])
    share_a = (labels[:, 0] >= 0).mean()
    assert abs(share_a - 0.7) < 0.02  # 12,800 draws: binomial std 0.004
    assert ((labels[:, 0] >= 0) != (labels[:, 1] >= 0)).all()  # each row has exactly one task's label
    x = np.concatenate([b["x"][:, 0] for b in batches])
    from_a = labels[:, 0] >= 0
    np.testing.assert_array_equal(labels[from_a, 0], x[from_a] % 3)  # the label is the row's own record's
    np.testing.assert_array_equal(labels[~from_a, 1], (x[~from_a] - 1000) % 3)
    first_epoch_a = x[from_a][:50]
    assert sorted(first_epoch_a) == list(range(50))  # task a's stream: each example once per epoch


def test_sampler_is_deterministic_and_resumes():
    take = lambda it, n: [b["x"].tolist() + b["labels"].tolist() for b in itertools.islice(it, n)]
    a, b = mixed(seed=3), mixed(seed=3)
    full = take(a(0), 12)
    assert full == take(b(0), 12)
    assert take(mixed(seed=3)(7), 5) == full[7:]  # a fresh object resumes at step 7
    assert take(a(4), 3) == full[4:7]
    assert take(mixed(seed=4)(0), 12) != full


def test_bad_configs(mt):
    with pytest.raises(ValueError, match="unknown task 'c'"):
        multitask.task_model(mt, "c")
    for rates, match in [
        ({"a": 0.0, "b": 1.0}, "> 0"),
        ({"a": -1, "b": 1}, "> 0"),
        ({"a": float("nan"), "b": 1}, "> 0"),
        ({"a": 1.0}, "miss task"),
        ({"a": 1, "b": 1, "c": 1}, "unknown task"),
    ]:
        with pytest.raises(ValueError, match=match):
            mixed(rates=rates)
    with pytest.raises(ValueError, match="unknown mixing"):
        multitask.mixing_rates({"a": 1}, "sqrt")
    with pytest.raises(ValueError, match="needs weights"):
        multitask.mixing_rates({"a": 1}, "explicit")
    with pytest.raises(ValueError, match="temperature"):
        multitask.mixing_rates({"a": 1}, "temperature", temperature=0)
    batch = make_batch()
    out = outputs_of(mt, mt.params, batch)
    with pytest.raises(ValueError, match="differ from the model's heads"):
        multitask.MultiTaskLoss(("a", "c"))(out, batch)
    with pytest.raises(ValueError, match="one column per task"):
        multitask.MultiTaskLoss(("a", "b"))(out, {**batch, "labels": batch["labels"][:, 0]})
    no_log_vars = {k: v for k, v in out.items() if k != "log_vars"}
    with pytest.raises(ValueError, match="uncertainty=True"):
        multitask.MultiTaskLoss(("a", "b"), uncertainty=True)(no_log_vars, batch)
    with pytest.raises(ValueError, match="drop the fixed weights"):
        multitask.MultiTaskLoss(("a", "b"), weights={"a": 1, "b": 1}, uncertainty=True)
    with pytest.raises(ValueError, match="identifiers"):
        multitask.heads_for({"task a": 3})
    with pytest.raises(ValueError, match="num_classes"):
        multitask.heads_for({"a": 0})


def token_records(n, offset, classes):
    ids, mask = token_batch(n, 8, seed=offset)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "label": (i + offset) % classes} for i in range(n)]


def fit(loaded, schedule):
    data = multitask.MixedTrainData(
        {"a": token_records(24, 0, 3), "b": token_records(16, 1, 2)}, {"a": 0.5, "b": 0.5}, batch_size=8, threads=0
    )
    config = EngineConfig(devices=1, progress=False, tensorboard=False, log_every=1)
    loss_fn = multitask.MultiTaskLoss(tuple(TASKS), uncertainty=True)
    return engine.fit(loaded, schedule, data, config, loss_fn=loss_fn)


def changed(before, after) -> set[str]:
    b, a = tree.flatten(before), tree.flatten(jax.device_get(after))
    return {p for p in b if not np.array_equal(np.asarray(b[p]), np.asarray(a[p]))}


def test_freezing_schedule_acts_on_the_shared_backbone(mt):
    """Linear probe, then top-1 block (the engine's one loop): the probe trains exactly the heads and their loss
    weights; at the end the top block and the heads moved, never the bottom block or the embeddings."""
    sched = FreezingSchedule(
        (
            Phase(2, rules="linear_probe", learning_rate=1e-2, name="probe"),
            Phase(2, rules="top_k", rule_args={"k": 1}, learning_rate=1e-3, name="top1"),
        )
    )
    result = fit(mt, sched)
    assert [h.name for h in result.history] == ["probe", "top1"]
    probe = result.plan.phases[0].partition
    trained = {p for g in probe.groups if g.rule.trainable for p in g.paths}
    assert trained == {p for p in tree.paths(mt.params) if p.startswith("head/")}
    assert result.history[0].trainable_params == tree.count(mt.params["head"])
    metrics = result.history[-1].metrics
    assert {"loss_a", "loss_b", "accuracy_a", "accuracy_b", "log_var_a"} <= set(metrics)
    moved = changed(mt.params, result.state.params)
    assert {"head/task_weights/a", "head/task_weights/b", "head/heads_a/out/kernel", "head/heads_b/out/kernel"} <= moved
    assert any(p.startswith("backbone/encoder/layer_1/") for p in moved)
    assert not any(p.startswith(("backbone/encoder/layer_0/", "backbone/embeddings/")) for p in moved)


def test_labels_outside_a_heads_classes_stop_training_with_the_task_named(mt):
    """Regression: a label past a task's classes made that task's loss NaN (the engine then blamed the learning
    rate), one below -1 silently dropped its row, and the sampler took a negative label as "no label"."""
    sched = FreezingSchedule((Phase(1, rules="linear_probe", learning_rate=1e-2),))
    data = multitask.MixedTrainData(
        {"a": token_records(8, 0, 5), "b": token_records(8, 1, 2)}, {"a": 0.5, "b": 0.5}, batch_size=8, threads=0
    )  # task a's records have labels up to 4; its head has 3 classes
    config = EngineConfig(devices=1, progress=False, tensorboard=False)
    with pytest.raises(ValueError, match=r"task 'a' has label [34] \(row \d+\), outside \[0, 3\)"):
        engine.fit(mt, sched, data, config, loss_fn=multitask.MultiTaskLoss(tuple(TASKS)))
    loss = multitask.MultiTaskLoss(tuple(TASKS))
    with pytest.raises(ValueError, match="task 'b' has label -7"):
        loss.check_labels({"labels": np.array([[0, -1], [-1, -7]])}, TASKS)
    loss.check_labels({"labels": np.array([[2, -1], [-1, 1]])}, TASKS)  # in range, and -1 = no label: accepted
    records = token_records(4, 0, 3)
    records[1]["label"] = -7
    sampler = multitask.MixedTrainData({"a": records}, {"a": 1.0}, batch_size=4, threads=0)
    with pytest.raises(ValueError, match=r"task 'a': record \d has label -7"):
        sampler.batch(0)


def test_evaluate_tasks_matches_the_multitask_outputs(mt):
    batch = make_batch(n=8, seed=2)
    out = outputs_of(mt, mt.params, batch)
    data = {}
    for k, t in enumerate(TASKS):
        rows = batch["labels"][:, k] >= 0
        data[t] = [
            {
                "input_ids": batch["input_ids"][rows],
                "attention_mask": batch["attention_mask"][rows],
                "labels": batch["labels"][rows, k],
            }
        ]
    metrics = multitask.evaluate_tasks(mt, data)
    for k, t in enumerate(TASKS):
        rows = batch["labels"][:, k] >= 0
        want = (np.asarray(out["logits"][t])[rows].argmax(-1) == batch["labels"][rows, k]).mean()
        assert metrics[t]["accuracy"] == pytest.approx(want)
        assert metrics[t]["loss"] == pytest.approx(mean_ce(np.asarray(out["logits"][t]), batch["labels"][:, k]), 1e-5)


@pytest.mark.parametrize("arg", ["multi", "uncertainty_equal", "single_examples", "single_lexnames_long"])
def test_experiment_config_builds_without_training(arg, hub_cache):
    config = importlib.import_module("experiments.configs.multitask").get_config(arg)
    job = importlib.import_module("experiments.multitask").build(config)
    tasks = list(config.tasks)
    assert multitask.task_names(job.loaded) == tuple(tasks) == job.loss_fn.tasks
    assert job.loss_fn.uncertainty == arg.startswith("uncertainty")
    assert job.schedule.lengths() == [160 if arg.endswith(("_equal", "_long")) else 80]  # twice the rows / steps
    batch = job.train_data.batch(0)
    assert batch["labels"].shape == (config.data.batch_size, len(tasks))
    assert batch["input_ids"].shape[1] in config.data.buckets
    plan = freezing.resolve(job.schedule, job.loaded, **job.engine_config.optimizer)
    assert plan.phases[0].partition.count("train") > tree.count(job.loaded.params["head"])
    assert sum(job.rates.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown multitask config"):
        importlib.import_module("experiments.configs.multitask").get_config("single_nope")


def test_a_multitask_rerun_with_another_config_is_refused(monkeypatch, tmp_path):
    """Regression: a rerun in the same workdir with another config (more steps, another weighting) reported the old
    results.json; now config.json is written before training and a rerun of another config is an error naming the
    keys (build, fit and evaluation stubbed: the bookkeeping alone)."""
    from types import SimpleNamespace

    experiment = importlib.import_module("experiments.multitask")
    calls = []

    def build(config, workdir=None):
        return SimpleNamespace(loaded=None, schedule=None, train_data=None, engine_config=None, loss_fn=None,
                               train={"a": [0] * 4}, test={"a": [0] * 2}, rates={"a": 1.0}, test_data={})  # fmt: skip

    def fit(*args, **kwargs):
        calls.append((tmp_path / "seed_0" / "config.json").is_file())
        (tmp_path / "seed_0" / "checkpoints" / "10").mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(state=SimpleNamespace(step=np.int32(10), params={}), status="completed", history=[])

    monkeypatch.setattr(experiment, "build", build)
    monkeypatch.setattr(engine, "fit", fit)
    monkeypatch.setattr(multitask, "evaluate_tasks", lambda *a, **k: {"a": {"accuracy": 0.5}})
    monkeypatch.setattr(multitask, "log_variances", lambda params: {})
    config = importlib.import_module("experiments.configs.multitask").get_config("multi")
    first = experiment.run(config, tmp_path / "seed_0")
    assert calls == [True] and first["config"]["loss"]["weighting"] == config.loss.weighting
    assert experiment.run(config, tmp_path / "seed_0") == first and len(calls) == 1
    other = config.copy_and_resolve_references()
    other.loss.weighting = "uncertainty"
    other.schedule.phases[0]["steps"] = 40
    with pytest.raises(ValueError, match=r"loss\.weighting, schedule\.phases.* differ\): use a new --workdir"):
        experiment.run(other, tmp_path / "seed_0")
    assert len(calls) == 1
