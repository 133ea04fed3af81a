"""The main job: every config builds (model, partition, schedule, data) without training; a tiny job runs end to end,
writes results.json, is reported again without training, resumes when interrupted, and predicts from its export."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import signal

import numpy as np
import pytest

from tljax import data, freezing, job

# one worker runs this module under `pytest -n 2 --dist loadgroup`: its module fixtures (whole runs) are built once
pytestmark = pytest.mark.xdist_group("test_job")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# adapt.py and multitask.py configure experiments/adapt.py and experiments/multitask.py (their own sections), built in
# tests/test_adaptation.py and tests/test_multitask.py
NOT_JOBS = ("__init__", "base", "adapt", "multitask")
CONFIGS = sorted(p.stem for p in (ROOT / "experiments" / "configs").glob("*.py") if p.stem not in NOT_JOBS)


def config_of(name: str, arg=None):
    return importlib.import_module(f"experiments.configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_without_training(name, hub_cache):
    """Hub ids resolve to tiny stand-ins of the same architecture; TFDS sources to TFDS's mock data."""
    import tensorflow_datasets as tfds

    config = config_of(name)
    assert config.name and (importlib.import_module(f"experiments.configs.{name}").__doc__ or "").count("python -m")
    with tfds.testing.mock_data(num_examples=1200):  # one batch of the TPU configs after a validation carve
        built = job.build(config)
    assert built.splits.train.num_classes == built.loaded.model.head.num_classes
    if config.mode == "finetune":
        plan = freezing.resolve(built.schedule, built.loaded, steps_per_epoch=built.train_data.steps_per_epoch)
        assert plan.total_steps > 0 and all(p.partition.count("train") > 0 for p in plan.phases)
    else:
        assert built.schedule is None and config.mode in ("probe", "zero_shot")
    batch = built.train_data.batch(0)
    assert len(batch["labels"]) == config.data.batch_size
    assert ("input_ids" in batch) == (built.splits.train.kind == "text")
    if built.splits.train.kind == "image":
        assert batch["pixel_values"].shape[1:] == (3, built.inputs.preprocess.size, built.inputs.preprocess.size)


def test_every_peft_config_and_sweep_point_builds(hub_cache):
    """experiments/configs/peft.py's methods and every point of sweeps/peft.py resolve to jobs whose first phase
    trains exactly the PEFT parameters and the head (or the schedule's own groups for BitFit / LP-FT / full)."""
    from experiments.configs import peft as peft_configs
    from tljax import peft, sweep, tree

    small = dict(train_size=64, validation_size=32, test_size=32)  # the model and schedule are what is checked
    for name in peft_configs.METHODS:
        config = config_of("peft", name)
        config.data.update(small)
        built = job.build(config)
        plan = freezing.resolve(built.schedule, built.loaded, steps_per_epoch=built.train_data.steps_per_epoch)
        head = tree.count(built.loaded.params["head"])
        assert plan.phases[0].partition.count("train") == peft.trainable_count(built.loaded) + head, name
        assert plan.total_steps == 230
    spec = sweep.load_config("experiments/configs/sweeps/peft.py:1")
    points = sweep.points(spec)
    assert [p.values["method"] for p in points] == list(spec.axes["method"])
    for point in points:  # the same model/schedule sections as the configs built above, or the schedule ablation's
        config = sweep.job_config(spec, point)
        kinds = [peft.from_config(m).KIND for m in config.model.peft]
        method = point.values["method"]
        assert kinds == ([] if method in ("bitfit", "lp_ft", "full") else [method.split("_")[0]])
        assert freezing.get(config.schedule.name, built.loaded, **config.schedule.args.to_dict()).total_steps() == 230
    chosen = sweep.load_config("experiments/configs/sweeps/peft.py:seeds=1+2,methods=lora_r4+prompt")
    assert [tuple(p.values.values()) for p in sweep.points(chosen)] == [
        ("lora_r4", 1), ("lora_r4", 2), ("prompt", 1), ("prompt", 2)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown methods"):
        sweep.load_config("experiments/configs/sweeps/peft.py:methods=lora_r5")
    with pytest.raises(ValueError, match="seeds are non-negative integers"):
        sweep.load_config("experiments/configs/sweeps/peft.py:seeds=one+2")


def test_depth_sweep_points_cut_the_checkpoint(hub_cache):
    """sweeps/depth.py: the default job with model.num_layers = 1 .. 6; a point builds a model of that many blocks
    (MiniLM-L6 from the offline package), one deeper than the checkpoint is a clear error."""
    from tljax import sweep

    spec = sweep.load_config("experiments/configs/sweeps/depth.py:1")
    configs = [sweep.job_config(spec, p) for p in sweep.points(spec)]
    assert [c.model.num_layers for c in configs] == [1, 2, 3, 4, 5, 6] and {c.seed for c in configs} == {0}
    assert len(sweep.points(sweep.load_config("experiments/configs/sweeps/depth.py"))) == 18
    config = configs[0]
    config.data.update(dict(train_size=64, validation_size=32, test_size=32))
    built = job.build(config)
    assert built.loaded.hf_config.num_hidden_layers == 1 and list(built.loaded.params["backbone"]["encoder"]) == [
        "layer_0"
    ]
    assert freezing.get("full", built.loaded, steps=1).total_steps() == 1
    config.model.num_layers = 7
    with pytest.raises(ValueError, match="the checkpoint has 6 blocks; keep 1 to 6"):
        job.build(config)
    with pytest.raises(ValueError, match="number of seeds"):
        sweep.load_config("experiments/configs/sweeps/depth.py:two")


def test_regularizer_configs_reach_the_engine(hub_cache):
    """engine.regularizer: name "" is off; each regulariser takes its own keys of the shared section."""
    config = config_of("default")
    config.data.update(dict(train_size=64, validation_size=32, test_size=32))
    assert job.build(config).engine_config.regularizer is None
    l2 = config_of("regularized")
    l2.data.update(dict(train_size=64, validation_size=32, test_size=32))
    assert job.build(l2).engine_config.regularizer == {"name": "l2_sp", "alpha": 0.01, "beta": 0.01}
    delta = config_of("regularized", "delta")
    delta.data.update(dict(train_size=64, validation_size=32, test_size=32))
    delta.engine.regularizer.layers = [-1]
    assert job.build(delta).engine_config.regularizer == {"name": "delta", "alpha": 0.01, "layers": [-1]}
    delta.engine.regularizer.name = "l3_sp"
    with pytest.raises(ValueError, match="unknown regularizer name 'l3_sp'"):
        job.build(delta)


def test_config_errors_are_clear(hub_cache):
    config = config_of("default")
    config.unknown = 1
    with pytest.raises(ValueError, match=r"unknown config section\(s\) \['unknown'\]"):
        job.build(config)
    config = config_of("default")
    config.data.test = "wordnet_examples:test"
    config.data.classes = ["noun.animal", "noun.plant"]
    config.data.train = "digits:train"
    with pytest.raises(ValueError, match="unknown class 'noun.animal'"):
        job.build(config)


def tiny_config(model_dir: str, **data_overrides):
    """The default job on the tiny stand-in BERT: 64 definitions, 2 probe + 3 fine-tuning steps."""
    config = config_of("default")
    config.model.name = model_dir
    config.data.update(dict(train_size=64, validation_size=48, test_size=40, batch_size=16, eval_batch_size=32))
    config.data.update(data_overrides)
    config.schedule.args = {"probe_steps": 2, "ft_steps": 3, "probe_lr": 1e-2, "ft_lr": 1e-3}
    config.engine.checkpoint.every = 1
    return config


@pytest.fixture(scope="module")
def tiny_text_dir(planted_hub):
    return str(next((planted_hub / "models--bert-base-uncased" / "snapshots").iterdir()))


@pytest.fixture(scope="module")
def finished(tiny_text_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("job") / "run"
    return job.run(tiny_config(tiny_text_dir), workdir, progress=False), workdir


def test_results_json_has_what_a_table_needs(finished):
    results, workdir = finished
    assert json.loads((workdir / "results.json").read_text()) == json.loads(json.dumps(results))
    assert 0 <= results["test_accuracy"] <= 1 and results["status"] == "completed"
    assert [p["name"] for p in results["phases"]] == ["probe", "finetune"]
    probe, ft = results["phases"]
    assert probe["trainable_params"] < ft["trainable_params"] <= ft["total_params"]
    assert probe["validation"]["accuracy"] is not None and probe["test"]["accuracy"] is not None
    assert results["test_accuracy_by_phase"] == {"probe": probe["test"]["accuracy"], "finetune": ft["test"]["accuracy"]}
    assert results["test_accuracy"] == ft["test"]["accuracy"]  # no best metric: the final model is reported
    assert results["data"]["sizes"] == {"train": 64, "validation": 48, "test": 40}
    assert len(results["confusion_matrix"]) == 26 and sum(map(sum, results["confusion_matrix"])) == 40
    assert set(results["versions"]) >= {"jax", "flax", "optax", "tljax"} and results["seed"] == 0
    assert results["config"]["data"]["train_size"] == 64 and results["train_examples_per_second"] > 0
    for name in ("config.json", "metrics.jsonl", "evals.json", "export/config.json", "export/tokenizer.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").iterdir())


def test_a_finished_workdir_is_reported_without_training(finished, tiny_text_dir, monkeypatch):
    results, workdir = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished job must not train again")

    monkeypatch.setattr(job.engine, "fit", no_training)
    assert job.run(tiny_config(tiny_text_dir), workdir) == json.loads(json.dumps(results))
    other = tiny_config(tiny_text_dir)
    other.schedule.args.ft_steps = 4
    with pytest.raises(ValueError, match=r"holds a run of another config \(schedule.args.ft_steps differ\)"):
        job.run(other, workdir)


def test_an_interrupted_job_resumes_to_the_same_result(finished, tiny_text_dir, tmp_path, monkeypatch):
    """SIGTERM (a preemption notice) at step 3 of 5: the job saves and exits; the rerun resumes from the checkpoint
    and ends with the same test accuracy and bitwise the same exported weights as the uninterrupted run."""
    results, done = finished
    original = data.TrainData.__call__

    def preempted_at_3(self, step=0):
        for s, batch in enumerate(original(self, step), start=step):
            if s == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data.TrainData, "__call__", preempted_at_3)
    with pytest.raises(SystemExit, match="preempted at step 3: rerun the same command to resume"):
        job.run(tiny_config(tiny_text_dir), tmp_path / "run", progress=False)
    monkeypatch.setattr(data.TrainData, "__call__", original)
    again = job.run(tiny_config(tiny_text_dir), tmp_path / "run", progress=False)
    assert again["test_accuracy"] == results["test_accuracy"] and again["phases"] == results["phases"]
    assert again["train_steps_this_run"] == 2
    from safetensors.numpy import load_file

    a, b = (
        load_file(done / "export" / "model.safetensors"),
        load_file(tmp_path / "run" / "export" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_predict_reads_the_export_and_matches_the_model(finished, capsys):
    import tljax.models as tm
    from experiments import predict

    _, workdir = finished
    texts = ["a domestic animal that barks", "a sweet baked food"]
    assert predict.main(["--workdir", str(workdir), "--top", "2", *texts]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("'a domestic animal that barks': noun.")
    loaded, labels, inputs, tokenizer = predict.load(str(workdir))
    assert labels == list(data.load("wordnet_lexnames:test").label_names)
    batch = next(predict.batches(texts, inputs, tokenizer))
    logits = np.asarray(loaded.model.apply(loaded.variables, **batch)["logits"])
    top = labels[int(logits[0].argmax())]
    assert out[0].split(": ", 1)[1].startswith(top)
    assert tm.load_pretrained(workdir / "export").model.head.num_classes == 26


def test_a_peft_job_trains_only_its_parameters_and_exports_them(tiny_text_dir, tmp_path):
    """model.peft weaves LoRA and adapters in; schedule "peft" trains them and the head; the export merges LoRA and
    keeps the adapters beside the base weights, and experiments.predict reads it back with the same logits."""
    import tljax.models as tm
    from experiments import predict
    from tljax import peft, tree

    config = tiny_config(tiny_text_dir)
    config.model.peft = [{"method": "lora", "rank": 2}, {"method": "adapter", "size": 4, "style": "pfeiffer"}]
    config.schedule.name, config.schedule.args = "peft", {"steps": 3, "lr": 1e-2}
    built = job.build(config)
    assert [m.KIND for m in peft.methods_of(built.loaded)] == ["lora", "adapter"]
    results = job.run(config, tmp_path / "run", progress=False)
    (phase,) = results["phases"]
    assert phase["trainable_params"] == peft.trainable_count(built.loaded) + tree.count(built.loaded.params["head"])
    export = tmp_path / "run" / "export"
    again = tm.load_pretrained(export)
    assert [m.KIND for m in peft.methods_of(again)] == ["adapter"]  # LoRA merged into the kernels
    loaded, labels, inputs, tokenizer = predict.load(str(tmp_path / "run"))
    batch = next(predict.batches(["a domestic animal that barks"], inputs, tokenizer))
    assert np.isfinite(np.asarray(loaded.model.apply(loaded.variables, **batch)["logits"])).all()
    with pytest.raises(TypeError, match="override field 'peft'"):  # ml_collections keeps the list type
        tiny_config(tiny_text_dir).model.peft = {"method": "lora"}


def test_probe_mode_reports_a_linear_probe(tiny_text_dir, tmp_path):
    config = tiny_config(tiny_text_dir)
    config.mode = "probe"
    config.probe.l2_grid = [1e-3, 1e-1]
    results = job.run(config, tmp_path / "probe", progress=False)
    assert results["mode"] == "probe" and 0 <= results["test_accuracy"] <= 1
    assert set(results["probe"]["validation_accuracy_by_l2"]) == {"0.001", "0.1"}
    assert len(list((tmp_path / "probe" / "features").glob("*.npz"))) == 3  # train, validation, test cached
