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


def image_folder(root: pathlib.Path, sizes: dict[str, tuple[int, int]]) -> pathlib.Path:
    """root/<split>/<red|blue>/<i>.png: noisy red and blue images of (width, height) `sizes[split]`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, (w, h) in sizes.items():
        for c, name in enumerate(("blue", "red")):
            (root / split / name).mkdir(parents=True)
            for i in range(8 if split == "train" else 2):
                pixels = rng.integers(0, 90, (h, w, 3))
                pixels[..., 2 - 2 * c] += 160
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_predict_on_images_uses_the_evaluation_preprocessing(planted_hub, tmp_path):
    """experiments.predict resizes and crops image files as the job's evaluation does: on images whose size (24x20,
    not square) differs from the model's (32, a crop of 36), its probabilities equal those of the job's own eval
    pipeline over the same files."""
    from experiments import predict
    from tljax import evaluation

    resnet = str(next((planted_hub / "models--microsoft--resnet-50" / "snapshots").iterdir()))
    root = image_folder(tmp_path / "images", {"train": (20, 24), "test": (24, 20)})
    config = config_of("fashion_mnist_resnet")
    config.model.name = resnet
    config.data.update(dict(train=f"folder:{root}:train", test=f"folder:{root}:test", image_size=32, batch_size=8,
                            eval_batch_size=8, validation_fraction=0.25))  # fmt: skip
    config.data.augment.update(dict(random_resized_crop=False, flip=False))
    config.schedule.args = {"probe_steps": 1, "ft_steps": 1, "probe_lr": 1e-2, "ft_lr": 1e-3}
    config.engine.eval_every = 0
    job.run(config, tmp_path / "run", progress=False)
    loaded, labels, inputs, tokenizer = predict.load(str(tmp_path / "run"))
    assert labels == ["blue", "red"] and (inputs["size"], inputs["crop_pct"]) == (32, 0.875)
    built = job.build(config)
    test = built.splits.test
    pipeline = evaluation.predict(loaded, built.test_data(), label_names=labels, top_k=2)
    paths = [str(p) for p in test.records.paths]
    predicted = evaluation.predict(loaded, predict.batches(paths, inputs, tokenizer, batch_size=3), top_k=2)
    assert predicted.probs.shape == (4, 2)
    np.testing.assert_allclose(predicted.probs, pipeline.probs, rtol=1e-6, atol=1e-7)


def write_csv(path: pathlib.Path, header: str, rows: list[tuple[str, str]]) -> str:
    path.write_text("\n".join([header] + [f"{text},{label}" for text, label in rows]) + "\n")
    return f"file:{path}"


WORDS = {"animal": "cow horse dog lion", "food": "rice bread soup apple", "tool": "saw drill wrench hammer"}


def labelled_rows(labels: list[str], n: int) -> list[tuple[str, str]]:
    return [(" ".join(np.roll(WORDS[c].split(), i)[:3]), c) for i in range(n) for c in labels]


def test_validation_and_test_files_are_read_in_trains_label_space(tiny_text_dir, tmp_path):
    """Validation and test files lacking a class of train are read in train's label space (train's label names are
    passed to the file reader); data.text_column / data.label_column name the columns of a GLUE-style CSV."""
    config = tiny_config(tiny_text_dir, train_size=0, validation_size=0, test_size=0)
    header = "sentence,label"
    config.data.train = write_csv(tmp_path / "train.csv", header, labelled_rows(["animal", "food", "tool"], 8))
    config.data.validation = write_csv(tmp_path / "val.csv", header, labelled_rows(["tool", "animal"], 2))
    config.data.test = write_csv(tmp_path / "test.csv", header, labelled_rows(["tool", "animal"], 3))
    with pytest.raises(data.DataFileError, match=r"no column 'text'.*in the job: --config.data.text_column"):
        job.build(config)
    config.data.text_column = "sentence"
    built = job.build(config)
    assert built.label_names == ("animal", "food", "tool") and built.loaded.model.head.num_classes == 3
    assert built.splits.validation.label_names == built.splits.test.label_names == built.label_names
    assert built.splits.validation.labels.tolist() == [2, 0, 2, 0]
    assert built.splits.test.labels.tolist() == [2, 0] * 3
    assert built.splits.test[0] == {"text": "saw drill wrench", "label": 2}
    config.data.classes = ("tool", "animal")  # a subset relabels every split alike: tool 0, animal 1
    splits = job.load_splits(config.data)
    assert splits.train.label_names == splits.test.label_names == ("tool", "animal")
    assert splits.test.labels.tolist() == [0, 1] * 3 and splits.test[1]["label"] == 1
    config.data.classes = ()
    config.data.label_column = "category"
    with pytest.raises(
        data.DataFileError,
        match=r"no column 'category'.*in the job: --config.data.text_column, --config.data.label_column",
    ):
        job.load_splits(config.data)
    unseen = write_csv(tmp_path / "unseen.csv", "sentence,label", [("a red car", "vehicle")])
    config.data.label_column, config.data.test = "label", unseen
    with pytest.raises(data.DataFileError, match=r"line 2: unknown label 'vehicle'"):
        job.load_splits(config.data)


def test_file_options_apply_to_file_sources_only(hub_cache):
    config = config_of("default")
    config.data.text_column = "sentence"
    with pytest.raises(ValueError, match=r"data.text_column 'sentence' is an option of file: sources, but data.train"):
        job.load_splits(config.data)
    config.data.text_column = "text"
    config.data.label_names = ("a", "b")
    with pytest.raises(ValueError, match=r"data.label_names \('a', 'b'\) is an option of file: sources"):
        job.load_splits(config.data)


def test_one_based_integer_labels_take_data_label_names(tiny_text_dir, tmp_path):
    """Integer labels 1..3 are refused as class indices (class 0 would have no example); the file reader's fix
    (label_names=) is named as the job's key, which reads them as names, and test files follow train's space."""
    config = tiny_config(tiny_text_dir, train_size=0, validation_size=0, test_size=0, validation="")
    rows = [(text, str(1 + "aft".index(c[0]))) for text, c in labelled_rows(["animal", "food", "tool"], 8)]
    config.data.train = write_csv(tmp_path / "train.csv", "text,label", rows)
    config.data.test = write_csv(tmp_path / "test.csv", "text,label", rows[1:3])
    with pytest.raises(
        data.DataFileError, match=r"label_names=.*reading data.train; in the job: --config.data.label_names"
    ):
        job.load_splits(config.data)
    config.data.label_names = ("1", "2", "3")
    splits = job.load_splits(config.data)
    assert splits.train.label_names == splits.test.label_names == ("1", "2", "3")
    assert splits.test.labels.tolist() == [1, 2] and splits.test[0]["label"] == 1


def test_an_image_test_folder_lacking_a_class_is_read_in_trains_label_space(tmp_path):
    """Sources without a label_names option (an image folder of its own) are mapped into train's classes by name;
    a class train lacks is an error."""
    image_folder(tmp_path / "train", {"all": (8, 8)})
    image_folder(tmp_path / "test", {"all": (8, 8)})
    import shutil

    shutil.rmtree(tmp_path / "test" / "all" / "blue")
    config = config_of("default").data
    config.update(dict(train=f"folder:{tmp_path / 'train' / 'all'}", validation="", validation_fraction=0.25,
                       test=f"folder:{tmp_path / 'test' / 'all'}"))  # fmt: skip
    splits = job.load_splits(config)
    assert splits.test.label_names == ("blue", "red") and splits.test.labels.tolist() == [1, 1]
    assert splits.test[0]["label"] == 1
    (tmp_path / "test" / "all" / "green").mkdir()
    shutil.copy(tmp_path / "test" / "all" / "red" / "0.png", tmp_path / "test" / "all" / "green")
    with pytest.raises(ValueError, match=r"has class\(es\) \['green'\] that .* lacks"):
        job.load_splits(config)


def test_training_data_of_one_class_is_refused(tiny_text_dir, tmp_path):
    """One class trains a head that is always right: the job refuses it before loading the model."""
    config = tiny_config(tiny_text_dir, train_size=0, validation_size=0, test_size=0, validation="")
    config.data.train = write_csv(tmp_path / "train.csv", "text,label", labelled_rows(["food"], 20))
    config.data.test = write_csv(tmp_path / "test.csv", "text,label", labelled_rows(["food"], 2))
    with pytest.raises(ValueError, match=r"data.train \(file:.*train.csv\) has examples of 1 class \(\['food'\]\)"):
        job.build(config)
    config.data.train = write_csv(tmp_path / "train.csv", "text,label", labelled_rows(["food", "tool"], 20))
    config.data.test = write_csv(tmp_path / "test.csv", "text,label", labelled_rows(["food", "tool"], 2))
    config.data.classes = ("tool",)
    with pytest.raises(ValueError, match=r"has examples of 1 class \(\['tool'\]\).*at least 2"):
        job.build(config)


def test_a_max_length_beyond_the_position_table_fails_at_build(tiny_text_dir):
    """The tiny BERT has 512 positions: data.max_length 600 is refused by build, before any training, naming the
    key and the limit; 512 builds."""
    config = tiny_config(tiny_text_dir, max_length=600, buckets=())
    with pytest.raises(ValueError, match=r"data.max_length 600 .*the model's limit of 512 tokens"):
        job.build(config)
    config.data.max_length = 512
    assert job.build(config).inputs.eval_batcher.buckets[-1] == 512


def test_selection_metrics_are_checked_at_build_naming_their_key(tiny_text_dir):
    """A metric name that evaluation does not give fails in build (before training), naming the key that holds
    it; the names checked are those an evaluation gives."""
    config = tiny_config(tiny_text_dir)
    assert job.eval_metric_names(26) == ("loss", "accuracy", "top5_accuracy", "macro_f1", "balanced_accuracy", "ece")
    assert job.eval_metric_names(3)[2] == "top3_accuracy"
    config.engine.checkpoint.best_metric = "acc"
    with pytest.raises(ValueError, match=r"engine.checkpoint.best_metric 'acc' is not an evaluation metric"):
        job.build(config)
    config.engine.checkpoint.best_metric = ""
    config.engine.early_stopping.update(dict(patience=2, metric="f1"))
    with pytest.raises(ValueError, match=r"engine.early_stopping.metric 'f1' is not an evaluation metric.*macro_f1"):
        job.build(config)
    config.engine.early_stopping.metric = "macro_f1"
    assert job.build(config).engine_config.checkpoint.best_metric == "macro_f1"


def test_eval_metric_names_are_what_evaluation_gives(finished):
    results, _ = finished
    assert tuple(results["phases"][0]["validation"]) == job.eval_metric_names(26)


def test_a_run_rejected_before_its_first_checkpoint_leaves_the_workdir_reusable(tiny_text_dir, tmp_path):
    """Batch 9 on 8 devices fails at the first step: a rerun with another config in the same workdir trains (the
    failed attempt's config and logs are set aside under attempts/1, so the new run's logs are its own)."""
    import jax

    if jax.device_count() < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    config = tiny_config(tiny_text_dir, batch_size=jax.device_count() + 1)
    with pytest.raises(ValueError, match="not divisible"):
        job.run(config, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "config.json").is_file()
    short = tiny_config(tiny_text_dir, eval_buckets=(48,))  # one compiled step and eval shape: the workdir is tested
    short.schedule = {"name": "linear_probe", "args": {"steps": 1, "lr": 1e-2}}
    results = job.run(short, tmp_path / "run", progress=False)
    assert results["status"] == "completed" and results["config"]["data"]["batch_size"] == 16
    attempt = tmp_path / "run" / "attempts" / "1"
    assert json.loads((attempt / "config.json").read_text())["data"]["batch_size"] == config.data.batch_size
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["batch_size"] == 16
    assert (attempt / "metrics.jsonl").is_file() and (tmp_path / "run" / "metrics.jsonl").read_text()


def test_an_early_stopped_run_reports_what_happened(tiny_text_dir, tmp_path):
    """Early stopping at step 8 of a fine-tune planned to 42: the phase reports its actual end (8), its last
    evaluation and its test accuracy there; best_validation is the selected checkpoint's evaluation (ties: the
    latest, as the checkpoint manager selects)."""
    job_run = importlib.import_module("tljax.job.run")  # the module (tljax.job.run is also the function)

    config = tiny_config(tiny_text_dir)
    config.schedule.args.ft_steps = 40
    config.engine.eval_every = 2
    config.engine.early_stopping.update(dict(patience=2, min_delta=0.5))
    results = job.run(config, tmp_path / "run", progress=False)
    evals = {e["step"]: e["metrics"] for e in json.loads((tmp_path / "run" / "evals.json").read_text())}
    assert results["status"] == "early_stopped" and sorted(evals) == [2, 4, 6, 8]
    probe, ft = results["phases"]
    assert (probe["start"], probe["end"], probe["planned_end"]) == (0, 2, 2)
    assert (ft["start"], ft["end"], ft["planned_end"]) == (2, 8, 42)
    assert ft["validation"] == evals[8] and probe["validation"] == evals[2]
    assert ft["test"]["accuracy"] == results["test_accuracy_by_phase"]["finetune"] is not None
    best = max(evals.items(), key=lambda kv: (kv[1]["accuracy"], kv[0]))  # the best, the latest of ties
    assert results["best_validation"] == {"metric": "accuracy", "value": best[1]["accuracy"], "step": best[0],
                                          "phase": "probe" if best[0] == 2 else "finetune"}  # fmt: skip
    assert results["selected"] == {"which": "best_validation", "step": best[0]}
    if best[0] == 8:
        assert results["test"] == ft["test"]
    summary = job.flat_summary(results)
    assert "steps 2-8 " in summary and "stopped early (planned 2-42)" in summary
    tied = [{"step": s, "phase": "p", "metrics": {"accuracy": a, "loss": 1.0 / s}} for s, a in [(2, 0.5), (4, 0.5)]]
    assert job_run._best_eval(tied, "accuracy", "max")["step"] == 4
    assert job_run._best_eval(tied, "loss", "min")["step"] == 4
    assert job_run._best_eval(tied, "accuracy", "max", step=2)["step"] == 2


def parse_config_flags(monkeypatch, config_file: str, *overrides: str):
    """The job config as experiments/finetune.py parses its command line (ml_collections' config_flags)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["finetune", f"--config={config_file}", *overrides]
    monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(argv)
    return values.config


def test_list_valued_keys_are_set_on_the_command_line(monkeypatch, hub_cache):
    """Keys holding sequences (data.classes, data.buckets, model.reinit, model.peft, ...) are tuples, which absl
    overrides: `--config.data.classes='(0,1)'` or repeated flags; nothing downstream needs lists."""
    from tljax import peft
    from tljax.job.defaults import base_config

    default = str(ROOT / "experiments" / "configs" / "default.py")
    config = parse_config_flags(monkeypatch, default, "--config.data.classes=(2,3)", "--config.data.buckets=(24,48)",
                                "--config.model.reinit=^head/", "--config.data.eval_buckets=8",
                                "--config.data.eval_buckets=48")  # fmt: skip
    assert (config.data.classes, config.data.buckets) == ((2, 3), (24, 48))
    assert (config.model.reinit, config.data.eval_buckets) == (("^head/",), (8, 48))
    config.data.update(dict(train_size=64, validation_size=32, test_size=32))
    splits = job.load_splits(config.data)
    names = data.load("wordnet_lexnames:train").label_names
    assert splits.train.label_names == splits.test.label_names == (names[2], names[3])
    config = parse_config_flags(monkeypatch, default, "--config.model.peft=({'method': 'lora', 'rank': 2},)",
                                "--config.schedule.name=peft")  # fmt: skip
    config.schedule.args = {"steps": 3, "lr": 1e-2}
    config.data.update(dict(train_size=64, validation_size=32, test_size=32))
    built = job.build(config)
    assert built.inputs.batcher.buckets == (16, 32, 48)  # default.py's
    assert [(m.KIND, m.rank) for m in peft.methods_of(built.loaded)] == [("lora", 2)]
    defaults = importlib.import_module("tljax.job.run")._flat(base_config().to_dict())
    assert [k for k, v in defaults.items() if isinstance(v, list)] == []  # every sequence default is a tuple
