"""A sweep config as data: its fields, the points of its grid, and the job config of each point."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections

log = logging.getLogger("tljax")

RUNS, SWEEP_FILE, POINT_FILE, ERROR_FILE, LOG_FILE = "runs", "sweep.json", "point.json", "error.txt", "log.txt"
CSV_FILE, SUMMARY_FILE, PLOTS = "sweep.csv", "summary.md", "plots"
FIELDS = {"name": "", "base": "", "overrides": {}, "axes": {}, "points": [], "metric": "test_accuracy",
          "metric_mode": "max", "x_axis": "", "before": {}}  # fmt: skip
# in override values: the sweep's work directory, and a point's axis value ({axis.seed})
SWEEP_DIR, AXIS_VALUE = "{sweep_dir}", re.compile(r"\{axis\.([A-Za-z0-9_.+-]+)\}")


SEED = "seed"  # the replicate axis


MODES = ("inprocess", "subprocess")


ATTEMPTS = 2  # a failed run is retried once


CURVE_METRIC = "accuracy"  # the validation metric the curves plot


ROOT = Path(__file__).resolve().parents[2]  # the checkout: relative config paths, `experiments` for subprocesses


def config(
    base: str,
    axes: Mapping[str, Sequence | Mapping[str, Mapping]],
    *,
    overrides: Mapping[str, Any] | None = None,
    points: Sequence[Mapping[str, Any]] = (),
    metric: str = "test_accuracy",
    metric_mode: str = "max",
    x_axis: str = "",
    name: str = "",
    before: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """A sweep config (fields: see the module docstring).

    Returns:
      A ConfigDict whose `overrides`, `axes` and `points` stay plain dicts and lists: a ConfigDict would sort the
      axes and refuse dotted keys. Its scalar fields can still be set from the command line.
    """
    c = ml_collections.ConfigDict(convert_dict=False)
    c.name, c.base, c.metric, c.metric_mode, c.x_axis = name, base, metric, metric_mode, x_axis
    c.overrides, c.axes, c.points = dict(overrides or {}), dict(axes), [dict(p) for p in points]
    c.before = {k: spec(v) for k, v in (before or {}).items()}
    spec(c)  # mistakes show where the config is written
    return c


def spec(sweep_config) -> dict:
    """The sweep config as checked plain data (what sweep.json holds).

    Raises:
      ValueError: an unknown field, a missing base, an axis without values, a variant that is not a dict.
    """
    raw = sweep_config.to_dict() if hasattr(sweep_config, "to_dict") else dict(sweep_config)
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown sweep config field(s) {unknown}; valid: {list(FIELDS)}")
    s = json.loads(json.dumps({**FIELDS, **raw}))  # plain data only (tuples become lists)
    if not s["base"]:
        raise ValueError("a sweep config needs `base`, the job config (e.g. 'experiments/configs/default.py')")
    if s["metric_mode"] not in ("max", "min"):
        raise ValueError(f"metric_mode must be 'max' or 'min', not {s['metric_mode']!r}")
    for axis, values in s["axes"].items():
        if not values or not isinstance(values, list | dict):
            raise ValueError(f"axis {axis!r} needs a non-empty list of values or dict of variants, not {values!r}")
        bad = [k for k, v in values.items() if not isinstance(v, dict)] if isinstance(values, dict) else []
        if bad:
            raise ValueError(f"axis {axis!r}: variant(s) {bad} must be dicts of dotted config keys")
    if not isinstance(s["before"], dict):
        raise ValueError(f"before must be a dict of stage name -> sweep config, not {s['before']!r}")
    for stage, sub in s["before"].items():
        if stage in (RUNS, PLOTS) or folder_name(stage) != stage:
            raise ValueError(f"before stage {stage!r}: needs a plain folder name other than {RUNS!r} and {PLOTS!r}")
        s["before"][stage] = spec(sub)
    return s


@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    name: str  # "schedule=lp_ft,seed=1": axis=value in axis order
    values: dict  # axis -> value (a variant's name, or the key's value)
    overrides: dict  # dotted key -> value from the axes (the sweep's `overrides` apply first)
    folder: str  # its work directory under runs/: filesystem-safe and stable (a function of the name)


def points(sweep_config) -> list[Point]:
    """The sweep's points: the product of the axes in axis order (the last varies fastest), or the given `points`
    with the axes each leaves out crossed.

    Raises:
      ValueError: a point naming an unknown axis or value, two axes setting one key, two points of one name.
    """
    s = spec(sweep_config)
    combos = [c for partial in (s["points"] or [{}]) for c in _crossed(partial, s["axes"])]
    out = [_point(combo, s["axes"]) for combo in combos]
    names = [p.name for p in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"points repeat: {repeated}")
    return out


def _crossed(partial: dict, axes: dict) -> list[dict]:
    unknown = sorted(set(partial) - set(axes))
    if unknown:
        raise ValueError(f"point {partial} names unknown axis(es) {unknown}; the axes: {list(axes)}")
    for axis, value in partial.items():
        if value not in list(axes[axis]):
            raise ValueError(f"point {partial}: {value!r} is not a value of axis {axis!r} ({list(axes[axis])})")
    options = [[partial[a]] if a in partial else list(values) for a, values in axes.items()]
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*options)]


def _point(combo: dict, axes: dict) -> Point:
    overrides, owner = {}, {}
    for axis, value in combo.items():
        pairs = axes[axis][value] if isinstance(axes[axis], dict) else {axis: value}
        for key, v in pairs.items():
            if key in owner:
                raise ValueError(f"axes {owner[key]!r} and {axis!r} both set {key!r}")
            overrides[key], owner[key] = v, axis
    name = ",".join(f"{axis}={label(value)}" for axis, value in combo.items()) or "base"
    return Point(name, combo, overrides, folder_name(name))


def label(value) -> str:
    """An axis value as text (point names, tables): strings as they are, numbers as Python prints them."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def folder_name(name: str) -> str:
    """A point's folder: its name when that is filesystem-safe, else a cleaned prefix and a hash of the name."""
    safe = re.sub(r"[^A-Za-z0-9._,=+-]+", "_", name)
    if safe == name and len(name) <= 120 and not name.startswith((".", "-")):
        return name
    return f"{safe[:80].lstrip('.-')}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


def take_shard(items: Sequence, index: int, count: int) -> list:
    """Shard `index` of `count`: items index, index + count, ... (one process per host)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
    return list(items[index::count])


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/n" -> (i, n)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard takes i/n (e.g. 0/2), not {text!r}")
    index, count = int(match[1]), int(match[2])
    take_shard([], index, count)  # checks the range
    return index, count


def load_config(where: str):
    """`get_config(arg)` of a config module, as `--config` reads it.

    Args:
      where: "path/to/file.py", "path/to/file.py:arg" or a module name ("experiments.configs.default"). Relative
        paths are looked up in the current directory, then in the checkout's root.
    """
    location, sep, arg = where.partition(":")
    path = config_file(location)
    module_spec = importlib.util.spec_from_file_location(f"_tljax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def config_file(location: str) -> Path:
    """The file of a config given as a path or a module name."""
    if location.endswith(".py"):
        found = next((p for p in (Path(location), ROOT / location) if p.is_file()), None)
        if found is None:
            raise ValueError(f"config file {location!r} not found (looked in {Path.cwd()} and {ROOT})")
        return found.resolve()
    module = importlib.util.find_spec(location)
    if module is None or not module.origin:
        raise ValueError(f"config {location!r} is neither a .py file nor an importable module")
    return Path(module.origin)


def job_config(sweep_config, point: Point, workdir: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
    """The base job config with the sweep's overrides, then the point's; in string values `{sweep_dir}` becomes
    `workdir` (absolute) and `{axis.<name>}` the point's value of that axis (a later stage naming an earlier
    stage's run: "{sweep_dir}/pretrain/runs/source=A,seed={axis.seed}/export").

    Raises:
      ValueError: a dotted key the base config does not have (named, with the point), a value of the wrong type, a
        placeholder without a workdir or naming an axis the point does not have.
    """
    s = spec(sweep_config)
    config = load_config(s["base"])
    for key, value in overrides_of(s, point):
        set_key(config, key, expand(value, point, workdir), point.name)
    return config


def expand(value, point: Point, workdir: str | os.PathLike | None):
    """`value` with the placeholders of its strings (in lists and dicts too) replaced; see `job_config`."""
    if isinstance(value, list):
        return [expand(v, point, workdir) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, point, workdir) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    if SWEEP_DIR in value:
        if workdir is None:
            raise ValueError(f"point {point.name}: {value!r} names {SWEEP_DIR} but no sweep directory was given")
        value = value.replace(SWEEP_DIR, str(Path(workdir).resolve()))

    def axis_value(match: re.Match) -> str:
        if match[1] not in point.values:
            raise ValueError(f"point {point.name}: {value!r} names axis {match[1]!r}, not one of {list(point.values)}")
        return label(point.values[match[1]])

    return AXIS_VALUE.sub(axis_value, value)


def overrides_of(s: dict, point: Point) -> list[tuple[str, Any]]:
    """Every (dotted key, value) of a point in the order they apply: the sweep's, then the axes'."""
    return [*s["overrides"].items(), *point.overrides.items()]


def set_key(config: ml_collections.ConfigDict, key: str, value, point: str = "") -> None:
    """Sets dotted `key` as `--config.<key>=<value>` does (a dict replaces a section whole).

    Raises:
      ValueError: the key does not exist (the message names the missing part and the keys there), or a type error.
    """
    where = f" (point {point})" if point else ""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            at = ".".join(parts[:i]) or "the config"
            there = f"its keys: {sorted(node.keys())}" if isinstance(node, ml_collections.ConfigDict) else "a value"
            raise ValueError(f"unknown config key {key!r}{where}: {at} has no {part!r} ({there})")
        if i < len(parts) - 1:
            node = node[part]
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise ValueError(f"config key {key!r}{where}: {e}") from None


def command(run_folder: str | os.PathLike, *, compilation_cache: str | None = None) -> list:
    """The command line that mode "subprocess" runs for the point in `run_folder` (its point.json written, the
    sweep's sweep.json two levels up): `python -m experiments.finetune --config <point.py>:<run_folder> --workdir
    <run_folder>`, where experiments/configs/sweeps/point.py returns `folder_config(run_folder)`. Not the base config
    with `--config.<key>=<value>` flags: a point's values (dicts of phases, None) do not all have a flag form."""
    folder = Path(run_folder).resolve()
    config = ROOT / "experiments" / "configs" / "sweeps" / "point.py"
    cache = [] if compilation_cache is None else [f"--compilation_cache={compilation_cache}"]
    return [sys.executable, "-m", "experiments.finetune", f"--config={config}:{folder}", f"--workdir={folder}", *cache]


def folder_config(run_folder: str | os.PathLike) -> ml_collections.ConfigDict:
    """The job config of the point whose run folder this is: `job_config` of `../../sweep.json` and its point.json."""
    folder = Path(run_folder)
    s = spec(json.loads((folder.parent.parent / SWEEP_FILE).read_text()))
    return job_config(s, Point(**json.loads((folder / POINT_FILE).read_text())), folder.parent.parent)


def lookup(obj, key: str):
    """A value of nested dicts and lists by dotted key ("phases.1.trainable_params"); None where absent."""
    for part in key.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def last_line(text: str) -> str:
    """The last non-empty line: an exception's type and message (or a process's exit status)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def write_text_atomic(path: Path, text: str) -> None:
    """Writes beside `path` under a unique name and renames into place (concurrent writers: the last one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
