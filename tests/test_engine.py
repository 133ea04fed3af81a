"""The training engine in one process on 8 fake CPU devices: layouts agree, accumulation, resharded resume,
checkpoint policy, eval metrics, logs, determinism, mixed precision and config errors."""

import itertools
import json

import jax
import numpy as np
import pytest
from engine_driver import global_batch, make_model, preempted

import tljax.models as tm
from tljax import engine, evaluation, freezing, parallel, tree
from tljax.checkpoints import CheckpointConfig, Checkpoints
from tljax.engine import EngineConfig

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_model")
    make_model(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return tm.load_pretrained(model_dir, num_classes=3, pooling="mean")


def data(start):
    for step in itertools.count(start):
        yield global_batch(step)


def eval_data():
    batch = global_batch(1000)
    batch["mask"] = np.r_[np.ones(12), np.zeros(4)].astype(np.float32)  # the last 4 rows are padding
    return [batch, global_batch(1001)]


def sched(loaded, steps=6):
    return freezing.get("lp_ft", loaded, probe_steps=steps // 2, ft_steps=steps - steps // 2, probe_lr=1e-2, ft_lr=1e-3)


def fit(loaded, tmp_path, name, steps=6, evaluate=False, **kw):
    cfg = {"workdir": str(tmp_path / name), "progress": False, "log_every": 1, **kw}
    return engine.fit(
        loaded, sched(loaded, steps), data, EngineConfig.from_config(cfg), eval_data=eval_data if evaluate else None
    )


def losses(tmp_path, name):
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def assert_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def single(loaded, tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    return engine.fit(
        loaded, sched(loaded), data, EngineConfig(str(path / "run"), devices=1, progress=False, log_every=1)
    ), path


@pytest.mark.parametrize("mode,kw", [("data", {}), ("fsdp", {"fsdp_min_size": 0}), ("pmap", {})])
def test_eight_devices_match_one(loaded, single, tmp_path, mode, kw):
    ref, ref_path = single
    result = fit(loaded, tmp_path, mode, parallel=mode, **kw)
    assert result.status == "completed" and int(result.state.step) == 6
    assert_close(result.state.params, ref.state.params)
    np.testing.assert_allclose(losses(tmp_path, mode), losses(ref_path, "run"), atol=1e-5)


def test_fsdp_really_shards(loaded):
    mesh = parallel.make_mesh()
    specs = tree.flatten(parallel.state_shardings(loaded.params, mesh, "fsdp", fsdp_min_size=0))
    sharded = [p for p, s in specs.items() if "data" in tuple(s.spec)]
    assert "backbone/encoder/layer_0/mlp/fc1/kernel" in sharded and len(sharded) > 20


def test_gradient_accumulation_matches_full_batch(loaded, single, tmp_path):
    ref, _ = single
    result = fit(loaded, tmp_path, "accum", accumulate=4, devices=1)
    assert_close(result.state.params, ref.state.params)


def test_resume_on_a_different_device_count(loaded, single, tmp_path):
    ref, _ = single
    cfg = {"checkpoint": {"every": 2}}
    first = engine.fit(
        loaded,
        sched(loaded),
        preempted(4),
        EngineConfig.from_config({"workdir": str(tmp_path / "r"), "progress": False, **cfg}),
    )
    assert first.status == "preempted" and int(first.state.step) == 4
    resumed = fit(loaded, tmp_path, "r", devices=1, **cfg)  # 8 devices wrote it, 1 device reads it
    assert int(resumed.state.step) == 6 and resumed.history[0].start == 4
    assert_close(resumed.state.params, ref.state.params)


def test_checkpoint_policy_keeps_latest_and_best(loaded, tmp_path):
    result = fit(
        loaded,
        tmp_path,
        "best",
        steps=8,
        evaluate=True,
        eval_every=2,
        devices=1,
        checkpoint={"every": 2, "keep": 1, "best_metric": "loss", "best_mode": "min"},
    )
    rows = [json.loads(x) for x in (tmp_path / "best" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["loss"] for r in rows if r["split"] == "eval"}
    best = min(evals, key=evals.get)
    ckpts = Checkpoints(tmp_path / "best" / "checkpoints", CheckpointConfig(best_metric="loss", best_mode="min"))
    assert set(ckpts.all_steps()) == {best, 4, 8} and ckpts.best_step() == best  # 4: the probe phase's end
    assert result.eval["loss"] == pytest.approx(evals[8])
    ckpts.close()


def test_eval_metrics_weighted_by_mask(loaded, single):
    ref, _ = single
    params = ref.state.params
    logits, labels = [], []
    for b in eval_data():
        keep = b.get("mask", np.ones(16)).astype(bool)
        out = loaded.model.apply({"params": params}, input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits.append(np.asarray(out["logits"])[keep])
        labels.append(b["labels"][keep])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    got = evaluation.evaluate(loaded, eval_data(), params=params)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == labels).mean())
    assert got["loss"] == pytest.approx(-logp[np.arange(len(labels)), labels].mean(), rel=1e-5)
    assert got["top3_accuracy"] == 1.0  # 3 classes: the label is always in the top 3


def test_logs_jsonl_and_tensorboard(single):
    _, path = single
    rows = [json.loads(line) for line in (path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "accuracy", "examples_per_second"} <= set(rows[0])
    assert list((path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_crashed_run_resumes_with_each_step_logged_once(loaded, tmp_path):
    """Regression: a run that crashed at step 5 after its checkpoint at 4 logged step 5 again when resumed (and
    TensorBoard held both): rows past the resumed checkpoint are dropped, events purged from it on."""

    def crash(start):
        for step in itertools.count(start):
            if step == 7:  # batch 7 is step 8's: steps 1-7 ran, the checkpoint of step 6 is the last
                raise RuntimeError("the machine went away")
            yield global_batch(step)

    cfg = EngineConfig(
        str(tmp_path / "c"), devices=1, progress=False, log_every=1, checkpoint=CheckpointConfig(every=2)
    )
    with pytest.raises(RuntimeError, match="went away"):
        engine.fit(loaded, sched(loaded, steps=8), crash, cfg)
    assert len(losses(tmp_path, "c")) == 7
    engine.fit(loaded, sched(loaded, steps=8), data, cfg)
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))


def test_same_seed_same_result(loaded, single, tmp_path):
    ref, _ = single
    again = fit(loaded, tmp_path, "again", devices=1)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(again.state.params), strict=True)
    )


def test_bf16_compute_fp32_master(model_dir, tmp_path, single):
    ref, ref_path = single
    half = tm.load_pretrained(model_dir, num_classes=3, pooling="mean", dtype="bfloat16", param_dtype="float32")
    result = fit(half, tmp_path, "bf16", devices=1)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(result.state.params))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(result.state.opt_state) if x.dtype.kind == "f")
    np.testing.assert_allclose(losses(tmp_path, "bf16"), losses(ref_path, "run"), atol=0.05)


def test_config_errors(loaded, tmp_path):
    with pytest.raises(ValueError, match=r"unknown engine config key\(s\) \['lr'\]"):
        EngineConfig.from_config({"workdir": "x", "lr": 1})
    with pytest.raises(ValueError, match="unknown parallel mode 'ddp'"):
        fit(loaded, tmp_path, "bad", parallel="ddp")
    with pytest.raises(ValueError, match="devices=9 but 8 are available"):
        fit(loaded, tmp_path, "bad2", devices=9)
    with pytest.raises(ValueError, match="not divisible by accumulate=3"):
        fit(loaded, tmp_path, "bad3", accumulate=3, devices=1)
    for bad in (0, -2, 1.5):  # regression: 0 failed as a ZeroDivisionError after the step compiled
        with pytest.raises(ValueError, match=f"EngineConfig.accumulate must be an int >= 1, got {bad}"):
            EngineConfig(accumulate=bad)


def test_a_workdir_in_use_is_refused(loaded, tmp_path):
    """Regression: a sweep stopped with SIGTERM left its children training, and the resumed sweep's new child wrote
    into the same run folder beside them (orbax: "Directory not empty"). A run holds a lock on its workdir."""
    held = engine.lock_workdir(tmp_path / "w")  # as another process's run would (flock: per open file)
    try:
        with pytest.raises(ValueError, match=rf"{tmp_path / 'w'} is in use by pid \d+ on .*: wait for that run"):
            fit(loaded, tmp_path, "w", devices=1)
    finally:
        held.close()
    assert int(fit(loaded, tmp_path, "w", devices=1).state.step) == 6  # released: the run goes ahead


def test_pmap_in_several_processes_is_refused(monkeypatch):
    """Regression: pmap compiled for every process's devices but was fed this process's: an XLA type error at the
    first step of a multi-host run."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="parallel='pmap' runs in one process, and this is one of 2: use "):
        parallel.Placement("pmap")
    assert parallel.Placement("data").mode == "data"


def test_eval_metrics_go_only_with_the_checkpoint_of_their_step(loaded, tmp_path):
    """Regression: a checkpoint saved at a step without evaluation carried the previous evaluation's metrics, so
    best-by-metric could keep a step that was never measured."""
    fit(
        loaded,
        tmp_path,
        "m",
        steps=8,
        evaluate=True,
        eval_every=4,
        devices=1,
        checkpoint={"every": 2, "keep": 4, "best_metric": "loss", "best_mode": "min"},
    )
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["loss"] for r in rows if r["split"] == "eval"}
    ckpts = Checkpoints(tmp_path / "m" / "checkpoints", CheckpointConfig(best_metric="loss", best_mode="min"))
    stored = {s: ckpts.manager.metrics(s) for s in ckpts.all_steps()}
    best = ckpts.best_step()  # read back from disk by a new manager, as a resumed run does
    ckpts.close()
    assert sorted(evals) == [4, 8] and sorted(stored) == [2, 4, 6, 8] and best == min(evals, key=evals.get)
    assert {s: (m or {}).get("loss") for s, m in stored.items()} == {2: None, 4: evals[4], 6: None, 8: evals[8]}


def test_labels_outside_the_classes_stop_with_a_clear_error(loaded, tmp_path):
    def bad(start):
        for step in itertools.count(start):
            batch = global_batch(step)
            if step == 2:
                batch["labels"][5] = 3  # the model has 3 classes
            yield batch

    with pytest.raises(ValueError, match=r"training batch for step 2: label 3 \(row 5\) is outside \[0, 3\)"):
        engine.fit(loaded, sched(loaded), bad, EngineConfig(devices=1, progress=False))
    with pytest.raises(ValueError, match=r"eval batch 0: label -1 \(row 0\) is outside \[0, 3\)"):
        evaluation.evaluate(loaded, [{**global_batch(0), "labels": np.full(16, -1)}])


def test_padding_rows_in_a_training_batch_are_an_error(loaded):
    """Regression: the training loss ignores `mask`, so an evaluation-style padded batch trained its padding rows
    (copies of the last example) as examples, silently."""

    def padded(start):
        for step in itertools.count(start):
            yield {**global_batch(step), "mask": np.r_[np.ones(12), np.zeros(4)].astype(np.float32)}

    with pytest.raises(ValueError, match=r"training batch for step 0 has padding rows \(mask 0\)"):
        engine.fit(loaded, sched(loaded), padded, EngineConfig(devices=1, progress=False))


def test_fsdp_state_is_built_sharded(loaded):
    """Each of 8 devices holds about 1/8 of the parameters and the Adam moments: the state is created inside jit
    with output shardings (never assembled on one device and then split)."""
    from tljax import partition, rules

    part = partition.build(loaded.params, rules.full(loaded), learning_rate=1e-3)
    placement = parallel.Placement("fsdp", fsdp_min_size=0)
    state = engine.initial_state(loaded, part, placement)
    total = tree.nbytes(state.params) + tree.nbytes(state.opt_state)
    per_device = parallel.device_bytes((state.params, state.opt_state))
    assert len(per_device) == 8
    assert max(per_device.values()) < 0.16 * total  # 1/8 = 0.125, plus the few arrays no dimension of splits 8 ways
    replicated = parallel.device_bytes(engine.initial_state(loaded, part, parallel.Placement("data")).params)
    assert min(replicated.values()) == tree.nbytes(state.params)


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(loaded, single, tmp_path):
    """Regression: with the newest checkpoint corrupted, resuming failed with a JSONDecodeError although an older
    good one was kept. Now it resumes from the older one, names the bad one, and moves it aside (never deleted)."""
    import logging

    ref, _ = single
    cfg = {"checkpoint": {"every": 2, "keep": 3}, "devices": 1}
    fit(loaded, tmp_path, "c", steps=6, **cfg)
    ckpt_dir = tmp_path / "c" / "checkpoints"
    (ckpt_dir / "6" / "state" / "_METADATA").write_text('{"trunc')  # step 6: damaged after it was written
    logger = logging.getLogger("tljax")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        resumed = fit(loaded, tmp_path, "c", steps=6, **cfg)
    finally:
        logger.removeHandler(handler)
    assert resumed.history[0].start == 4 and int(resumed.state.step) == 6
    assert_close(resumed.state.params, ref.state.params)
    assert any("checkpoint step 6" in r.getMessage() and "does not restore" in r.getMessage() for r in records)
    moved = list((tmp_path / "c" / "checkpoints.corrupt").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("6-") and (moved[0] / "state" / "_METADATA").exists()


def test_a_config_mismatch_is_an_error_not_damage(loaded, tmp_path):
    """When no checkpoint restores (here: another optimizer), nothing is moved: the error is raised."""
    fit(loaded, tmp_path, "x", steps=6, devices=1, checkpoint={"every": 2})
    with pytest.raises(RuntimeError, match="(?s)no checkpoint in .* restores; the newest.*holds a run of another"):
        fit(loaded, tmp_path, "x", steps=6, devices=1, checkpoint={"every": 2}, optimizer={"optimizer": "sgd"})
    assert not (tmp_path / "x" / "checkpoints.corrupt").exists()


def test_every_phase_ends_with_an_evaluation_and_a_kept_checkpoint(loaded, tmp_path):
    """LP-FT reports the probe beside the fine-tune: each phase's last step is evaluated and its checkpoint kept
    (keep=1 would otherwise delete it) and restorable."""
    result = fit(loaded, tmp_path, "phases", evaluate=True, devices=1, checkpoint={"every": 1, "keep": 1})
    phases = result.phase_evals()
    assert list(phases) == ["probe", "finetune"] and [e["step"] for e in result.evals] == [3, 6]
    assert [h.eval for h in result.history] == [phases["probe"], phases["finetune"]]
    ckpts = Checkpoints(tmp_path / "phases" / "checkpoints")
    assert ckpts.all_steps() == [3, 6]
    ckpts.close()
    probe = engine.restore_state(loaded, result.plan, tmp_path / "phases", 3, EngineConfig(devices=1))
    assert int(probe.step) == 3
    again = evaluation.evaluate(loaded, eval_data(), params=probe.params, collections=probe.collections)
    assert again["accuracy"] == phases["probe"]["accuracy"]
    assert json.loads((tmp_path / "phases" / "evals.json").read_text()) == result.evals


def test_evaluations_survive_a_resume(loaded, tmp_path):
    cfg = EngineConfig(str(tmp_path / "r"), devices=1, progress=False, checkpoint=CheckpointConfig(every=1))
    first = engine.fit(loaded, sched(loaded), preempted(5), cfg, eval_data=eval_data)
    assert first.status == "preempted" and [e["step"] for e in first.evals] == [3]
    resumed = engine.fit(loaded, sched(loaded), data, cfg, eval_data=eval_data)
    assert [e["step"] for e in resumed.evals] == [3, 6] and list(resumed.phase_evals()) == ["probe", "finetune"]
    assert resumed.evals[0] == first.evals[0]


def test_early_stopping_watches_the_final_phase_and_a_rerun_stays_stopped(loaded, tmp_path):
    """min_delta=10 makes every evaluation after the first of a phase a non-improvement: the probe phase runs to
    its end anyway, the fine-tune stops after `patience` evaluations without improvement."""
    cfg = EngineConfig.from_config(
        {"workdir": str(tmp_path / "es"), "devices": 1, "progress": False, "eval_every": 1,
         "early_stopping": {"metric": "loss", "mode": "max", "patience": 2, "min_delta": 10.0}}
    )  # fmt: skip
    assert cfg.checkpoint.best_metric == "loss" and cfg.checkpoint.best_mode == "max"
    result = engine.fit(loaded, sched(loaded, steps=12), data, cfg, eval_data=eval_data)
    assert result.status == "early_stopped" and int(result.state.step) == 9  # evals at 7, 8, 9: 8 and 9 not better
    assert [e["step"] for e in result.evals] == list(range(1, 10))
    evals = {e["step"]: e["metrics"]["loss"] for e in result.evals}
    assert result.best_step == max(evals, key=evals.get)
    rerun = engine.fit(loaded, sched(loaded, steps=12), data, cfg, eval_data=eval_data)
    assert rerun.status == "early_stopped" and int(rerun.state.step) == 9 and rerun.history == []
    with pytest.raises(ValueError, match="early_stopping watches 'loss' .* but checkpoint.best_metric is 'accuracy'"):
        EngineConfig(
            early_stopping=engine.EarlyStopping("loss", "min"), checkpoint=CheckpointConfig(best_metric="accuracy")
        )
    typo = EngineConfig(str(tmp_path / "typo"), devices=1, progress=False,
                        early_stopping=engine.EarlyStopping("f1", "max"))  # fmt: skip
    with pytest.raises(ValueError, match="early_stopping metric 'f1' is not an eval metric"):  # named its own key
        engine.fit(loaded, sched(loaded), data, typo, eval_data=eval_data)


def test_use_cpu_devices_splits_the_cpu_before_jax_starts_and_errors_after():
    """`parallel.use_cpu_devices` (the entry points' --cpu_devices) sets the count even over XLA_FLAGS; once JAX's
    backends run it is a clear error naming the fix, and bad counts are errors, never a silent one-device run."""
    import os
    import subprocess
    import sys

    code = "from tljax import parallel; n = parallel.use_cpu_devices(3); import jax; print(n, jax.device_count())"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3", "3"]
    jax.devices()  # this process's backends are running
    with pytest.raises(RuntimeError, match="before any JAX operation.*device_count=2"):
        parallel.use_cpu_devices(2)
    for bad in ("two", 0, -1):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            parallel.use_cpu_devices(bad)
