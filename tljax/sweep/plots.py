"""The sweep's plots (matplotlib, Agg): the metric per setting, validation curves, vs trainable params, vs x_axis."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tljax.sweep.spec import CURVE_METRIC, SEED, folder_name, label, lookup, read_json

if TYPE_CHECKING:
    from tljax.sweep.report import Run, Setting
log = logging.getLogger("tljax")


def plots(s: dict, settings: Sequence[Setting], runs: Sequence[Run], folder: Path) -> list[Path]:
    """PNGs (matplotlib's Agg canvas, no pyplot state): the metric per setting, validation curves, the metric vs
    trainable parameters, and vs `x_axis` when the sweep names one. A plot without data is left out."""
    metric = s["metric"]
    made = [
        _bar(settings, metric, folder / "by_setting.png"),
        _curves(settings, folder / "validation_curves.png"),
        _vs_params(settings, metric, folder / "vs_trainable_params.png"),
    ]
    if s["x_axis"]:
        x_axis = s["x_axis"]
        others = [a for a in s["axes"] if a not in (SEED, x_axis)]
        made.append(_vs_x(runs, x_axis, others, metric, folder / f"vs_{folder_name(x_axis)}.png"))
    return [p for p in made if p is not None]


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    os.replace(tmp, path)
    return path


def _bar(settings: Sequence[Setting], metric: str, path: Path) -> Path | None:
    scored = [st for st in settings if st.n]
    if not scored:
        return None
    fig, ax = _figure(max(5.0, 0.9 * len(scored) + 2))
    x = np.arange(len(scored))
    ax.bar(x, [st.mean for st in scored], yerr=[0.0 if st.n < 2 else st.std for st in scored], capsize=4,
           color="tab:blue", alpha=0.7)  # fmt: skip
    for i, st in enumerate(scored):  # every seed's value
        ax.scatter([i] * st.n, st.scores, color="black", s=12, zorder=3)
    ax.set_xticks(x, [st.name for st in scored], rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean ± std over seeds (dots: runs)", fontsize="medium")
    return _save(fig, path)


def _curves(settings: Sequence[Setting], path: Path) -> Path | None:
    fig, ax = _figure()
    drawn = False
    for i, st in enumerate(settings):
        for j, r in enumerate(st.runs):
            steps, values = validation_curve(r.folder)
            if steps:
                ax.plot(steps, values, marker=".", color=f"C{i % 10}", alpha=0.8, label=st.name if j == 0 else None)
                drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {CURVE_METRIC}")
    ax.set_title("validation curves (one line per run)", fontsize="medium")
    ax.legend(fontsize="small")
    return _save(fig, path)


def validation_curve(folder: Path) -> tuple[list[int], list[float]]:
    """A run's validation accuracy by step: evals.json, else the eval lines of metrics.jsonl."""
    rows = read_json(folder / "evals.json")
    if rows is None:
        lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").is_file() else []
        rows = [{"step": r["step"], "metrics": r} for r in map(json.loads, lines) if r.get("split") == "eval"]
    points = sorted((r["step"], r["metrics"][CURVE_METRIC]) for r in rows if CURVE_METRIC in r["metrics"])
    return [p[0] for p in points], [p[1] for p in points]


def _vs_params(settings: Sequence[Setting], metric: str, path: Path) -> Path | None:
    shown = [(st, st.average("phases.-1.trainable_params")) for st in settings if st.n]
    shown = [(st, p) for st, p in shown if p]
    if not shown:
        return None
    fig, ax = _figure()
    for i, (st, params) in enumerate(shown):
        ax.errorbar([params], [st.mean], yerr=[0.0 if st.n < 2 else st.std], fmt="o", capsize=4, color=f"C{i % 10}",
                    label=st.name)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (last phase)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs trainable parameters (mean ± std over seeds)", fontsize="medium")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _vs_x(runs: Sequence[Run], x_axis: str, others: Sequence[str], metric: str, path: Path) -> Path | None:
    """The metric against x_axis (an axis or a dotted key of the run's config), one line per setting of the other
    axes; numeric x when every value is a number, else categories in order of appearance."""
    series: dict[str, dict[Any, list[float]]] = {}
    for r in runs:
        score = r.value(metric)
        x = r.point.values[x_axis] if x_axis in r.point.values else lookup((r.results or {}).get("config"), x_axis)
        if score is not None and x is not None:
            name = ",".join(f"{a}={label(r.point.values[a])}" for a in others) or metric
            series.setdefault(name, {}).setdefault(x, []).append(score)
    if not series:
        return None
    xs = list(dict.fromkeys(x for by_x in series.values() for x in by_x))
    numeric = all(_number(x) is not None for x in xs)
    position = {x: _number(x) if numeric else i for i, x in enumerate(xs)}
    fig, ax = _figure()
    for name, by_x in series.items():
        order = sorted(by_x, key=lambda x: position[x])
        means = [float(np.mean(by_x[x])) for x in order]
        stds = [float(np.std(by_x[x], ddof=1)) if len(by_x[x]) > 1 else 0.0 for x in order]
        ax.errorbar([position[x] for x in order], means, yerr=stds, marker="o", capsize=4, label=name)
    if not numeric:
        ax.set_xticks(range(len(xs)), [label(x) for x in xs])
    ax.set_xlabel(x_axis)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x_axis} (mean ± std over seeds)", fontsize="medium")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _number(x) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
