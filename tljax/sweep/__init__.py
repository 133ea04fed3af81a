"""Sweeps: the fine-tuning job over a grid of config changes, each run in its own work directory, one table out.

    sweep_config = experiments.configs.sweeps.schedules.get_config()
    result = sweep.run(sweep_config, "runs/sweeps/schedules")   # resumable: finished runs are read, not retrained
    print(result.report.summary)                                  # mean ± std over seeds per setting
    sweep.report("runs/sweeps/schedules")                          # CSV, summary and plots again, from the folders

A sweep config is plain data (build it with `sweep.config(...)`, which keeps dotted keys and the axis order):
  base         the job config: a file ("experiments/configs/default.py", "file.py:arg") or a module name
  overrides    {dotted key: value} for every run, e.g. {"data.train_size": 64}
  axes         ordered {axis: values}. A list: values of the dotted key the axis is named after ("seed": [0, 1, 2],
               "optimizer.weight_decay": [0.0, 0.01]). A dict: named variants, each {dotted key: value, ...}, e.g.
               {"lp_ft": {"schedule.name": "lp_ft", "schedule.args": {...}}, "full": {...}}
  points       optional: a list of {axis: value} instead of the full product; axes a point leaves out are crossed
               ([{"schedule": "lp_ft"}] with a "seed" axis: LP-FT with every seed)
  metric       what the tables rank: a dotted key of results.json ("test_accuracy", "best_validation.value");
               metric_mode "max" or "min" says which end is best
  x_axis       optional: also plot the metric against this axis, or against a dotted key of each run's config
               (a top-k depth: "schedule.args.k", "schedule.phases.1.rule_args.k"); numbers, else categories
  before       optional {stage: sweep config}: sweeps that run first, each in DIR/<stage>/ (pre-training whose
               exports the grid loads); the grid starts once every run of them finished. In override values,
               "{sweep_dir}" is DIR and "{axis.<name>}" the point's value of that axis:
               "model.name": "{sweep_dir}/pretrain/runs/source=A,seed={axis.seed}/export"

The axis "seed" is the replicate axis: summaries average over it. Every dotted key must exist in the base config
(unknown keys are errors that name the key and the point); a dict value replaces a section whole (`schedule.args`),
as `--config.schedule.args="{...}"` does on the command line. Axis overrides apply after `overrides`.

The work directory:
  sweep.json        the sweep config as run (what `report` reads)
  runs/<point>/     one job's work directory (config.json, metrics.jsonl, evals.json, results.json, export/ ...) with
                    point.json (the point), log.txt (the job's log) and error.txt (the error of each failed attempt)
  sweep.csv         one row per run: point, axis values, status, metric, test_accuracy, per-phase test accuracies,
                    best validation value, wall_seconds, trainable params of the last phase, seed, run_dir, error.
                    status: the job's ("completed", "early_stopped"), "failed" (error.txt), "missing" (not run or
                    interrupted) or "stale" (finished with another config than the sweep's now: not counted)
  summary.md        mean ± sample std over seeds per setting (n shown), the best in bold, the failed runs
  plots/*.png       the metric per setting, validation curves, the metric vs trainable parameters (and vs x_axis)

Running: a point whose results.json exists is reported without training (`job.run` checks that its config is
unchanged); an interrupted one resumes; a failed run is retried once, then the sweep goes on and lists it. Mode
"inprocess" runs one job at a time in this process; "subprocess" runs up to `parallel` processes at a time, each
`python -m experiments.finetune --config experiments/configs/sweeps/point.py:<run folder> --workdir <run folder>`
(the same job config, rebuilt from sweep.json and point.json). Each process inherits this one's environment
(XLA_FLAGS, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, ...) and shares its devices: XLA's CPU backend already spreads
one run over every core, so on a 2-core CPU parallel > 1 only helps when runs wait on IO (data loading,
checkpoints, the export). One process per host: `shard=(i, n)` (`--shard i/n`) runs points i, i + n, ...; give
every host the same work directory on a shared filesystem and call `report` once all shards are done.
"""

from tljax.sweep.report import Report, Run, Setting, aggregate, best_setting, read_run, read_runs, report
from tljax.sweep.runner import Outcome, RunFailed, SweepResult, run
from tljax.sweep.spec import (
    Point,
    command,
    config,
    expand,
    folder_config,
    folder_name,
    job_config,
    load_config,
    lookup,
    parse_shard,
    points,
    spec,
    take_shard,
    write_text_atomic,
)

__all__ = [
    "Outcome", "Point", "Report", "Run", "RunFailed", "Setting", "SweepResult", "aggregate", "best_setting",
    "command", "config", "expand", "folder_config", "folder_name", "job_config", "load_config", "lookup", "parse_shard",
    "points", "read_run", "read_runs", "report", "run", "spec", "take_shard", "write_text_atomic",
]  # fmt: skip
