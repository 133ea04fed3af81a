"""The report of a sweep, from its run folders alone: sweep.csv, summary.md (mean ± std over seeds per setting)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tljax import job
from tljax.sweep.plots import plots
from tljax.sweep.spec import (
    CSV_FILE,
    ERROR_FILE,
    FIELDS,
    PLOTS,
    POINT_FILE,
    RUNS,
    SEED,
    SUMMARY_FILE,
    SWEEP_FILE,
    Point,
    job_config,
    label,
    last_line,
    lookup,
    points,
    read_json,
    spec,
    write_text_atomic,
)

log = logging.getLogger("tljax")


@dataclass
class Run:
    """One run as the report reads it from its folder."""

    point: Point
    folder: Path
    results: dict | None  # results.json; None while not finished
    error: str  # the last line of error.txt, or why the results are stale ("" if none)
    stale: bool = False  # finished with another config than the sweep's for this point: not counted

    @property
    def status(self) -> str:
        if self.stale:
            return "stale"
        if self.results is not None:
            return self.results.get("status", "completed")
        return "failed" if self.error else "missing"

    def value(self, key: str) -> float | None:
        """A finite number of results.json by dotted key, else None."""
        v = lookup(self.results or {}, key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclass
class Setting:
    """The runs of one setting of the axes other than the seed."""

    name: str
    values: dict  # axis -> value, the seed axis left out
    runs: list[Run]
    scores: list[float]  # the metric of each finished run

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores)) if self.scores else math.nan

    @property
    def std(self) -> float:
        """The sample standard deviation (n - 1); NaN for fewer than two runs."""
        return float(np.std(self.scores, ddof=1)) if self.n > 1 else math.nan

    def average(self, key: str) -> float | None:
        values = [v for v in (r.value(key) for r in self.runs if not r.stale) if v is not None]
        return float(np.mean(values)) if values else None


@dataclass
class Report:
    """What `report` wrote: the runs, the settings with their statistics, summary.md's text and the files."""

    runs: list[Run]
    settings: list[Setting]
    best: Setting | None
    summary: str
    files: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [r.point.name for r in self.runs if r.status in ("failed", "stale")]


def report(workdir: str | os.PathLike) -> Report:
    """Writes sweep.csv, summary.md and plots/ from the work directory: sweep.json and the run folders (without
    sweep.json: every runs/*/point.json, default metric). Runs not finished are rows with status "missing".

    Returns:
      The runs, the settings (mean ± std over seeds) with the best one, summary.md's text and the files written.
    """
    workdir = Path(workdir)
    s, runs = _listing(workdir)[0], read_runs(workdir)
    axes = list(s["axes"])
    settings = aggregate(runs, axes, s["metric"])
    best = best_setting(settings, s["metric_mode"])
    summary = summary_markdown(s, settings, best, runs)
    write_text_atomic(workdir / CSV_FILE, csv_text(runs, axes, s["metric"]))
    write_text_atomic(workdir / SUMMARY_FILE, summary)
    files = [workdir / CSV_FILE, workdir / SUMMARY_FILE, *plots(s, settings, runs, workdir / PLOTS)]
    return Report(runs, settings, best, summary, files)


def read_runs(workdir: str | os.PathLike) -> list[Run]:
    """Every run of a sweep's work directory as `report` reads it (results, errors, stale ones marked), writing
    nothing: for a tool that consumes a sweep's results (e.g. experiments.transferability --finetuned)."""
    workdir = Path(workdir)
    s, listed = _listing(workdir)
    return [read_run(p, workdir / RUNS / p.folder, _expected_config(s, p, workdir)) for p in listed]


def _listing(workdir: Path) -> tuple[dict, list[Point]]:
    if (workdir / SWEEP_FILE).is_file():
        s = spec(json.loads((workdir / SWEEP_FILE).read_text()))
        return s, points(s)
    found = [Point(**json.loads(f.read_text())) for f in sorted(workdir.glob(f"{RUNS}/*/{POINT_FILE}"))]
    if not found:
        raise FileNotFoundError(f"{workdir} holds no {SWEEP_FILE} and no {RUNS}/*/{POINT_FILE}: not a sweep")
    return {**json.loads(json.dumps(FIELDS)), "axes": {axis: [] for axis in found[0].values}}, found


def read_run(point: Point, folder: Path, expected: dict | None = None) -> Run:
    """A run from its folder; with `expected` (the sweep's resolved job config for the point), results of another
    config (the sweep or the base config changed since) are marked stale."""
    results, error = read_json(folder / job.RESULTS), folder / ERROR_FILE
    if results is None:
        return Run(point, folder, None, last_line(error.read_text()) if error.is_file() else "")
    saved = read_json(folder / job.CONFIG)
    changed = [] if expected is None or saved is None else job.config_changes(saved, expected)
    if not changed:
        return Run(point, folder, results, "")
    why = f"finished with another config ({', '.join(changed[:6])} differ): delete its folder to run it again"
    return Run(point, folder, results, why, stale=True)


def _expected_config(s: dict, point: Point, workdir: Path) -> dict | None:
    """The resolved job config of a point, None where it cannot be built (no sweep.json, base config gone)."""
    if not s["base"]:
        return None
    try:
        return job.resolved(job_config(s, point, workdir))
    except (ValueError, OSError, ImportError):
        return None


def aggregate(runs: Sequence[Run], axes: Sequence[str], metric: str) -> list[Setting]:
    """The runs grouped by every axis but the seed, in the sweep's order."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(label(r.point.values[a]) for a in axes if a != SEED), []).append(r)
    out = []
    for members in groups.values():
        values = {a: v for a, v in members[0].point.values.items() if a != SEED}
        name = ",".join(f"{a}={label(v)}" for a, v in values.items()) or "all"
        scores = [v for v in (r.value(metric) for r in members if not r.stale) if v is not None]
        out.append(Setting(name, values, members, scores))
    return out


def best_setting(settings: Sequence[Setting], mode: str) -> Setting | None:
    scored = [s for s in settings if s.n]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda s: s.mean)


def trainable_params(run: Run) -> int | None:
    """Trainable parameters of the run's last phase."""
    return lookup(run.results or {}, "phases.-1.trainable_params")


def csv_text(runs: Sequence[Run], axes: Sequence[str], metric: str) -> str:
    """sweep.csv: one row per run (empty cells where a run has no such value)."""
    by_phase = list(dict.fromkeys(k for r in runs for k in (r.results or {}).get("test_accuracy_by_phase") or {}))
    columns = ["point", *axes, "status", "metric", "test_accuracy", *(f"test_accuracy_by_phase.{p}" for p in by_phase),
               "best_validation", "wall_seconds", "train_examples_per_second", "trainable_params",
               *([] if SEED in axes else [SEED]), "run_dir", "error"]  # fmt: skip
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="", lineterminator="\n")
    writer.writeheader()
    for r in runs:
        row = {"point": r.point.name, **{a: label(r.point.values[a]) for a in axes}, **_numbers(r, metric, by_phase)}
        if SEED not in axes:
            row[SEED] = (r.results or {}).get(SEED)
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def _numbers(r: Run, metric: str, by_phase: Sequence[str]) -> dict:
    return {
        "status": r.status,
        "metric": r.value(metric),
        "test_accuracy": r.value("test_accuracy"),
        **{f"test_accuracy_by_phase.{p}": r.value(f"test_accuracy_by_phase.{p}") for p in by_phase},
        "best_validation": r.value("best_validation.value"),
        "wall_seconds": r.value("wall_seconds"),
        "train_examples_per_second": r.value("train_examples_per_second"),
        "trainable_params": trainable_params(r),
        "run_dir": f"{RUNS}/{r.point.folder}",
        "error": r.error,
    }


def summary_markdown(s: dict, settings: Sequence[Setting], best: Setting | None, runs: Sequence[Run]) -> str:
    """summary.md: a table of mean ± sample std per setting (best in bold), failed and unfinished runs."""
    axes = [a for a in s["axes"] if a != SEED] or ["setting"]
    metric = s["metric"]
    head = [*axes, f"{metric} (mean ± std)", "n", "trainable params", "train examples/s", "wall s / run"]
    lines = [f"# Sweep {s['name']}".rstrip(), "",
             f"{metric}: mean ± sample standard deviation over seeds; n: finished runs; best ({s['metric_mode']}) "
             "in bold.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for st in settings:
        cells = [*(label(st.values[a]) for a in axes)] if axes != ["setting"] else [st.name]
        params, wall = st.average("phases.-1.trainable_params"), st.average("wall_seconds")
        speed = st.average("train_examples_per_second")
        n = str(st.n) if st.n == len(st.runs) else f"{st.n} of {len(st.runs)}"
        cells += [_mean_std(st), n, *(_number(v, f) for v, f in ((params, ",.0f"), (speed, ".1f"), (wall, ".0f")))]
        lines.append("| " + " | ".join(f"**{c}**" if st is best and c else c for c in cells) + " |")
    failed = [r for r in runs if r.status in ("failed", "stale")]
    lines += ["", "## Failed runs", ""]
    where = lambda r: f"{RUNS}/{r.point.folder}" + ("" if r.stale else f"/{ERROR_FILE}")
    lines += [f"- `{r.point.name}`: {r.error} ({where(r)})" for r in failed] or ["none"]
    missing = [r.point.name for r in runs if r.status == "missing"]
    if missing:
        lines += ["", f"Not finished ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing)]
    return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _mean_std(st: Setting) -> str:
    if not st.n:
        return "–"
    return f"{st.mean:.4f}" if st.n == 1 else f"{st.mean:.4f} ± {st.std:.4f}"
