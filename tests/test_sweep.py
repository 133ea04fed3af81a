"""Sweeps: the tiny sweep (2 schedules x 2 seeds on the stand-in BERT) writes its CSV, summary and plots; a sweep
interrupted after one run resumes; a rerun trains nothing; a failing run is retried once and reported; --shard takes
every n-th point; unknown keys are clear errors; the subprocess command line builds the same job config."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import re
import statistics

import jax
import pytest

from tljax import engine, freezing, job, sweep
from tljax.job.defaults import base_config

# one worker runs this module under `pytest -n 2 --dist loadgroup`: its module fixtures (whole runs) are built once
pytestmark = pytest.mark.xdist_group("test_sweep")

TINY = "experiments/configs/sweeps/tiny.py"
POINTS = [f"schedule={s},seed={i}" for s in ("linear_probe", "full") for i in (0, 1)]
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_sweep(model: str):
    return sweep.load_config(f"{TINY}:{model}")


@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory):
    """The stand-in BERT of tests/test_job.py (2 blocks, width 32, the real uncased tokenizer), planted alone."""
    from hub_stand_ins import plant

    return str(plant(tmp_path_factory.mktemp("hub"), "bert-base-uncased"))


@pytest.fixture(scope="module")
def swept(tiny_text_dir, compilation_cache, tmp_path_factory):
    """The tiny sweep interrupted (Ctrl-C) while its second run starts, then run again to the end."""
    workdir = tmp_path_factory.mktemp("sweep")
    original, started = job.run, []

    def interrupted_at_second(config, folder, **kwargs):
        started.append(pathlib.Path(folder).name)
        if len(started) == 2:
            raise KeyboardInterrupt
        return original(config, folder, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(job, "run", interrupted_at_second)
        with pytest.raises(KeyboardInterrupt):  # an interrupt stops the sweep: it is no failed run
            sweep.run(tiny_sweep(tiny_text_dir), workdir)
    assert started == POINTS[:2] and (workdir / "runs" / POINTS[0] / "results.json").is_file()
    assert not (workdir / "runs" / POINTS[1] / "error.txt").exists()
    return sweep.run(tiny_sweep(tiny_text_dir), workdir), workdir


def read_csv(workdir: pathlib.Path) -> list[dict]:
    with open(workdir / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def table(summary: str) -> list[list[str]]:
    """summary.md's table rows (header and rule left out) as cells, bold marks kept."""
    rows = [line for line in summary.splitlines() if line.startswith("| ")][1:]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def test_an_interrupted_sweep_resumes_and_completes(swept):
    result, _ = swept
    assert [(o.point.name, o.status) for o in result.outcomes] == [
        (POINTS[0], "finished"), (POINTS[1], "completed"), (POINTS[2], "completed"), (POINTS[3], "completed")
    ]  # fmt: skip
    assert not result.failed and all(o.attempts == 1 for o in result.outcomes)


def test_a_sweep_writes_csv_summary_and_plots(swept):
    result, workdir = swept
    rows = read_csv(workdir)
    assert list(rows[0]) == [
        "point", "schedule", "seed", "status", "metric", "test_accuracy", "test_accuracy_by_phase.probe",
        "test_accuracy_by_phase.full", "best_validation", "wall_seconds", "train_examples_per_second",
        "trainable_params", "run_dir", "error",
    ]  # fmt: skip
    assert [r["point"] for r in rows] == POINTS and [r["seed"] for r in rows] == ["0", "1", "0", "1"]
    assert all(r["status"] == "completed" and r["metric"] == r["test_accuracy"] for r in rows)
    assert all(0 <= float(r["test_accuracy"]) <= 1 and float(r["wall_seconds"]) > 0 for r in rows)
    assert all(float(r["train_examples_per_second"]) > 0 for r in rows)
    probe, full = rows[0], rows[2]
    assert probe["test_accuracy_by_phase.probe"] == probe["test_accuracy"]
    assert probe["test_accuracy_by_phase.full"] == "" and full["test_accuracy_by_phase.probe"] == ""
    assert full["test_accuracy_by_phase.full"] == full["test_accuracy"]
    assert 0 < int(probe["trainable_params"]) < int(full["trainable_params"])
    assert probe["run_dir"] == f"runs/{POINTS[0]}" and float(probe["best_validation"]) >= 0

    summary = (workdir / "summary.md").read_text()
    assert summary == result.report.summary
    cells = table(summary)
    assert [c[0].strip("*") for c in cells] == ["linear_probe", "full"] and len(cells[0]) == 6
    for name, row in zip(["linear_probe", "full"], cells, strict=True):
        scores = [float(r["metric"]) for r in rows if r["schedule"] == name]
        assert row[1].strip("*") == f"{statistics.mean(scores):.4f} ± {statistics.stdev(scores):.4f}"
        assert row[2].strip("*") == "2"
        speeds = [float(r["train_examples_per_second"]) for r in rows if r["schedule"] == name]
        assert row[4].strip("*") == f"{statistics.mean(speeds):.1f}"
    best = max(cells, key=lambda c: float(c[1].strip("*").split(" ± ")[0]))
    assert all(c.startswith("**") for c in best) and sum(c[0].startswith("**") for c in cells) == 1
    assert "## Failed runs\n\nnone" in summary
    for name in ("by_setting.png", "validation_curves.png", "vs_trainable_params.png"):
        assert (workdir / "plots" / name).read_bytes().startswith(PNG), name
    assert (workdir / "sweep.json").is_file() and (workdir / "runs" / POINTS[1] / "log.txt").stat().st_size > 0


def test_rerunning_a_finished_sweep_trains_nothing(swept, tiny_text_dir, monkeypatch):
    result, workdir = swept
    before = (workdir / "sweep.csv").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(engine, "fit", no_training)
    again = sweep.run(tiny_sweep(tiny_text_dir), workdir)
    assert [o.status for o in again.outcomes] == ["finished"] * 4
    assert (workdir / "sweep.csv").read_text() == before and again.report.summary == result.report.summary


def test_subprocess_mode_runs_the_finetune_entry_point(tiny_text_dir, compilation_cache, tmp_path):
    config = tiny_sweep(tiny_text_dir)
    config.points = [{"schedule": "linear_probe", "seed": 0}]
    result = sweep.run(config, tmp_path, mode="subprocess", compilation_cache=compilation_cache)
    assert [o.status for o in result.outcomes] == ["completed"], (tmp_path / "runs" / POINTS[0] / "log.txt").read_text()
    log = (tmp_path / "runs" / POINTS[0] / "log.txt").read_text()
    assert "-m experiments.finetune" in log and "test_accuracy" in log
    assert result.outcomes[0].results["config"] == job.resolved(sweep.job_config(config, result.outcomes[0].point))
    assert result.outcomes[0].results["devices"] == {"platform": "cpu", "kind": "cpu", "count": jax.device_count(),
                                                     "processes": 1}  # inherited XLA_FLAGS  # fmt: skip


def fake_job(fail: set[str] = frozenset(), calls: list | None = None):
    """A stand-in for `job.run`: results from the config in no time; raises for the points named in `fail`."""

    def run(config, workdir, progress=False):
        workdir = pathlib.Path(workdir)
        if calls is not None:
            calls.append(workdir.name)
        if (workdir / "results.json").is_file():
            return json.loads((workdir / "results.json").read_text())
        if workdir.name in fail:
            raise RuntimeError("loss is NaN")
        acc = (0.5 if config.schedule.name == "full" else 0.3) + 0.01 * config.seed
        results = {"status": "completed", "test_accuracy": acc, "test_accuracy_by_phase": {config.schedule.name: acc},
                   "phases": [{"name": config.schedule.name, "trainable_params": 10}], "seed": config.seed,
                   "wall_seconds": 1.0, "config": job.resolved(config)}  # fmt: skip
        engine.write_json_atomic(workdir / "config.json", job.resolved(config))
        engine.write_json_atomic(workdir / "results.json", results)
        return results

    return run


def test_a_failing_run_is_retried_once_and_reported(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(job, "run", fake_job(fail={POINTS[3]}, calls=calls))
    result = sweep.run(tiny_sweep("unused-model"), tmp_path)
    assert calls == [*POINTS, POINTS[3]] and result.failed == [POINTS[3]]
    assert [o.attempts for o in result.outcomes] == [1, 1, 1, 2]
    error = (tmp_path / "runs" / POINTS[3] / "error.txt").read_text()
    assert "attempt 1 of 2" in error and "attempt 2 of 2" in error and error.count("RuntimeError: loss is NaN") == 2
    rows = read_csv(tmp_path)
    assert (rows[3]["status"], rows[3]["error"], rows[3]["metric"]) == ("failed", "RuntimeError: loss is NaN", "")
    summary = result.report.summary
    assert f"## Failed runs\n\n- `{POINTS[3]}`: RuntimeError: loss is NaN (runs/{POINTS[3]}/error.txt)" in summary
    assert table(summary)[1][:3] == ["**full**", "**0.5000**", "**1 of 2**"]  # the best, from one run

    calls.clear()  # the next invocation tries the failed run again; the others are only read
    monkeypatch.setattr(job, "run", fake_job(calls=calls))
    again = sweep.run(tiny_sweep("unused-model"), tmp_path)
    assert [o.status for o in again.outcomes] == ["finished"] * 3 + ["completed"] and not again.report.failed


def test_runs_of_another_config_are_stale_and_not_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "run", fake_job())
    sweep.run(tiny_sweep("unused-model"), tmp_path)
    changed = tiny_sweep("unused-model")
    changed.overrides = {**changed.overrides, "data.train_size": 32}
    sweep.write_text_atomic(tmp_path / "sweep.json", json.dumps(sweep.spec(changed)))  # as `run` of it writes it
    rep = sweep.report(tmp_path)
    assert [r.status for r in rep.runs] == ["stale"] * 4 and rep.failed == POINTS and rep.best is None
    assert "finished with another config (data.train_size differ): delete its folder" in rep.summary
    assert [r["status"] for r in read_csv(tmp_path)] == ["stale"] * 4


def test_a_run_older_than_a_new_key_at_its_default_is_not_stale():
    """Regression: adding a config key (e.g. model.peft) made every finished run "of another config"."""
    current = job.resolved(base_config())
    saved = json.loads(json.dumps(current))
    del saved["model"]["peft"], saved["engine"]["prefix_cache"]
    assert job.config_changes(saved, current) == []
    current["model"]["peft"] = [{"method": "lora"}]
    assert job.config_changes(saved, current) == ["model.peft"]
    del current["model"]["peft"]
    saved["model"]["peft"] = []
    assert job.config_changes(saved, current) == ["model.peft"]  # a key that went away is a change
    saved["model"]["options"] = {"image_size": 224}
    assert "model.options.image_size" in job.config_changes(saved, current)


def test_a_run_under_another_label_is_the_same_run():
    """The top-level name is a label: the PEFT sweep reads the schedule ablation's BitFit / LP-FT / full runs."""
    current = job.resolved(base_config())
    saved = {**json.loads(json.dumps(current)), "name": "schedule_ablation"}
    assert job.config_changes(saved, {**current, "name": "peft_methods"}) == []
    saved["model"]["name"] = "other"
    assert job.config_changes(saved, current) == ["model.name"]


@pytest.fixture
def logging_restored():
    """The entry point sets up logging for a command line (tljax INFO to stderr, absl at WARNING): undone after."""
    from absl import logging as absl_logging

    logger = logging.getLogger("tljax")
    saved = logger.handlers[:], logger.level, logger.propagate, absl_logging.get_verbosity()
    yield
    logger.handlers[:], _, logger.propagate, _ = saved
    logger.setLevel(saved[1])
    absl_logging.set_verbosity(saved[3])


def test_shard_takes_every_nth_point(tmp_path, monkeypatch, capsys, logging_restored):
    from experiments import sweep as entry_point

    monkeypatch.setattr(job, "run", fake_job())
    argv = ["--config", f"{TINY}:unused-model", "--workdir", str(tmp_path), "--compilation_cache", ""]
    assert entry_point.main([*argv, "--shard", "0/2"]) == 0
    assert [r["status"] for r in read_csv(tmp_path)] == ["completed", "missing", "completed", "missing"]
    out = capsys.readouterr().out
    assert f"[1/2] {POINTS[0]}: running" in out and f"[2/2] {POINTS[2]}" in out
    assert f"Not finished (2): `{POINTS[1]}`, `{POINTS[3]}`" in out
    assert entry_point.main([*argv, "--shard", "1/2"]) == 0
    assert [r["status"] for r in read_csv(tmp_path)] == ["completed"] * 4
    assert sweep.take_shard(list(range(5)), 1, 2) == [1, 3] and sweep.parse_shard(" 1 / 3") == (1, 3)
    for bad in ("2", "2/2", "a/b"):
        with pytest.raises(ValueError, match="i/n|0 <= i < n"):
            sweep.parse_shard(bad)


def test_unknown_keys_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "run", fake_job(fail=set(POINTS)))
    config = tiny_sweep("unused-model")
    config.overrides = {**config.overrides, "data.trian_size": 5}
    with pytest.raises(ValueError, match=re.escape(f"unknown config key 'data.trian_size' (point {POINTS[0]}): data "
                                                   "has no 'trian_size' (its keys: [")):  # fmt: skip
        sweep.run(config, tmp_path)
    assert not (tmp_path / "runs").exists()  # checked before anything runs
    config = tiny_sweep("unused-model")
    config.axes = {"schedule": {"full": {"schedul.name": "full"}}}
    with pytest.raises(ValueError, match="unknown config key 'schedul.name' .*the config has no 'schedul'"):
        sweep.job_config(config, sweep.points(config)[0])
    config.axes = {"seed": ["one"]}
    with pytest.raises(ValueError, match="config key 'seed' \\(point seed=one\\)"):
        sweep.job_config(config, sweep.points(config)[0])
    base = "experiments/configs/default.py"
    errors = {
        "unknown sweep config field\\(s\\) \\['axis'\\]": {"base": base, "axis": {}},
        "axis 'seed' needs a non-empty list": {"base": base, "axes": {"seed": []}},
        "variant\\(s\\) \\['full'\\] must be dicts": {"base": base, "axes": {"s": {"full": "schedule.name=full"}}},
        "names unknown axis\\(es\\) \\['schedul'\\]": {"base": base, "axes": {"seed": [0]}, "points": [{"schedul": 1}]},
        "2 is not a value of axis 'seed'": {"base": base, "axes": {"seed": [0]}, "points": [{"seed": 2}]},
        "axes 'a' and 'b' both set 'seed'": {"base": base, "axes": {"a": {"x": {"seed": 1}}, "b": {"y": {"seed": 2}}}},
    }
    for message, bad in errors.items():
        with pytest.raises(ValueError, match=message):
            sweep.points(bad)


def write_sweep(config, workdir: pathlib.Path) -> list:
    """sweep.json and every runs/<point>/point.json, as `sweep.run` writes them before running."""
    sweep.write_text_atomic(workdir / "sweep.json", json.dumps(sweep.spec(config)))
    for p in sweep.points(config):
        sweep.write_text_atomic(workdir / "runs" / p.folder / "point.json", json.dumps(dataclasses.asdict(p)))
    return sweep.points(config)


def test_the_subprocess_command_line_builds_the_same_job_config(tmp_path):
    """What `python -m experiments.finetune` parses from `command` is what mode "inprocess" runs (the same
    config.json, so either mode resumes the other's runs), list values (data.buckets) included."""
    from absl import flags
    from ml_collections import config_flags

    from experiments.configs.sweeps import schedules

    for name, config in {"tiny": tiny_sweep("some-model"), "schedules": schedules.get_config()}.items():
        for point in write_sweep(config, tmp_path / name)[::3]:
            folder = tmp_path / name / "runs" / point.folder
            cmd = sweep.command(folder, compilation_cache="")
            assert cmd[1:3] == ["-m", "experiments.finetune"] and cmd[3].endswith(f"sweeps/point.py:{folder}")
            assert cmd[4:] == [f"--workdir={folder}", "--compilation_cache="]
            parsed, argv = flags.FlagValues(), ["finetune", cmd[3]]
            config_flags.DEFINE_config_file("config", flag_values=parsed, sys_argv=argv)
            parsed(argv)
            assert job.resolved(parsed["config"].value) == job.resolved(sweep.job_config(config, point)), point.name


def test_report_from_the_run_folders_alone(tmp_path):
    """A top-k depth sweep written by hand: statistics, bold best, failed and missing runs, and the plot against
    the depth (x_axis); without sweep.json the report reads every runs/*/point.json."""
    config = sweep.config(
        base="experiments/configs/default.py",
        overrides={"schedule.name": "keras_recipe", "schedule.args": {"head_steps": 2, "finetune_steps": 3}},
        axes={"schedule.args.top_n": [1, 2, 4], "seed": [0, 1, 2]},
        x_axis="schedule.args.top_n",
    )
    scores = {1: [0.6, 0.7, None], 2: [0.8, 0.9, 0.7], 4: [0.85, 0.9, "failed"]}
    for p in write_sweep(config, tmp_path):
        folder = tmp_path / "runs" / p.folder
        score = scores[p.values["schedule.args.top_n"]][p.values["seed"]]
        if score == "failed":
            (folder / "error.txt").write_text("attempt 2 of 2\nTraceback ...\nValueError: bad\n")
        elif score is not None:
            phases = [{"name": "head", "trainable_params": 10}, {"name": "top_n", "trainable_params": 100 * score}]
            results = {"status": "completed", "test_accuracy": score, "phases": phases, "seed": p.values["seed"],
                       "test_accuracy_by_phase": {"head": 0.5, "top_n": score}, "wall_seconds": 2.0}  # fmt: skip
            (folder / "results.json").write_text(json.dumps(results))
            evals = [{"step": 2, "phase": "head", "metrics": {"accuracy": 0.5}},
                     {"step": 5, "phase": "top_n", "metrics": {"accuracy": score}}]  # fmt: skip
            (folder / "evals.json").write_text(json.dumps(evals))
    rep = sweep.report(tmp_path)
    assert [(s.name, s.n) for s in rep.settings] == [("schedule.args.top_n=1", 2), ("schedule.args.top_n=2", 3),
                                                     ("schedule.args.top_n=4", 2)]  # fmt: skip
    assert rep.best.name == "schedule.args.top_n=4" and rep.failed == ["schedule.args.top_n=4,seed=2"]
    assert table(rep.summary) == [
        ["1", "0.6500 ± 0.0707", "2 of 3", "65", "", "2"],  # no train_examples_per_second in these results
        ["2", "0.8000 ± 0.1000", "3", "80", "", "2"],
        ["**4**", "**0.8750 ± 0.0354**", "**2 of 3**", "**88**", "", "**2**"],
    ]
    assert "Not finished (1): `schedule.args.top_n=1,seed=2`" in rep.summary
    assert "- `schedule.args.top_n=4,seed=2`: ValueError: bad" in rep.summary
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["by_setting.png", "validation_curves.png", "vs_schedule.args.top_n.png", "vs_trainable_params.png"]
    rows = read_csv(tmp_path)
    assert [r["status"] for r in rows].count("completed") == 7 and rows[0]["test_accuracy_by_phase.top_n"] == "0.6"

    (tmp_path / "sweep.json").unlink()  # the run folders alone
    again = sweep.report(tmp_path)
    assert [r.point.name for r in again.runs] == sorted(r.point.name for r in rep.runs)
    assert {s.name: s.mean for s in again.settings} == {s.name: s.mean for s in rep.settings}


def test_sweep_configs_give_every_schedule_about_230_steps(tiny_text_dir):
    """The ablation's 7 built-ins x 3 seeds resolve (on the 2-block stand-in) and take 230 +- 5 steps at MiniLM-L6's
    depth of 6 blocks; the tiny sweep has 4 points."""
    import copy

    import tljax.models as tm
    from experiments.configs.sweeps import schedules

    loaded = tm.load_pretrained(tiny_text_dir, head=tm.ClassificationHead(26))
    six_blocks = copy.deepcopy(loaded.hf_config)
    six_blocks.num_hidden_layers = 6
    minilm_depth = dataclasses.replace(loaded, hf_config=six_blocks)
    config = schedules.get_config()
    pts = sweep.points(config)
    assert len(pts) == 21 and pts[0].name == "schedule=full,seed=0" and pts[-1].name == "schedule=bitfit,seed=2"
    for point in pts[::3]:
        schedule = sweep.job_config(config, point).schedule
        args = schedule.args.to_dict()
        assert freezing.resolve(freezing.get(schedule.name, loaded, **args), loaded).total_steps > 0
        total = freezing.get(schedule.name, minilm_depth, **args).total_steps()
        assert 225 <= total <= 235, (point.name, total)
    assert [p.name for p in sweep.points(tiny_sweep("m"))] == POINTS
    assert sweep.folder_name("model=google/vit-base,lr=0.001").startswith("model=google_vit-base,lr=0.001-")


def test_a_stopped_sweep_stops_its_runs_and_starts_no_more(tmp_path, monkeypatch):
    """Regression: SIGTERM to a sweep of mode "subprocess" left its runs training as orphans, and the next
    invocation trained beside them. `stop_children` (the sweep's SIGTERM handler) passes the signal on (the engine
    saves and exits on it) and no run starts or is retried afterwards."""
    import signal
    import sys
    import threading
    import time

    from tljax.sweep import runner

    monkeypatch.setattr(runner, "_STOPPING", threading.Event())
    trap = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(3)); print('re' + 'ady');"
    cmd = [sys.executable, "-c", trap + " sys.stdout.flush(); time.sleep(60)"]
    outcome = {}

    def launch():
        try:
            runner._subprocess(cmd, tmp_path)
        except BaseException as e:  # noqa: BLE001 - the test inspects what the worker thread raised
            outcome["error"] = e

    worker = threading.Thread(target=launch)
    worker.start()
    log = tmp_path / runner.LOG_FILE
    for _ in range(600):  # the child has set its handler once it prints "ready" (the command line does not)
        if log.exists() and "ready" in log.read_text():
            break
        time.sleep(0.05)
    (child,) = runner._CHILDREN
    runner.stop_children(signal.SIGTERM)
    worker.join(30)
    assert child.returncode == 3  # it got SIGTERM (the engine's preemption signal), not a kill
    assert isinstance(outcome["error"], runner.Stopped) and "rerun the sweep to resume" in str(outcome["error"])
    with pytest.raises(runner.Stopped, match="stopped before"):
        runner._subprocess(cmd, tmp_path)
    assert not runner._CHILDREN
