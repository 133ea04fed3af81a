"""Running a sweep: every point through `tljax.job.run` (in this process or as subprocesses), finished points
read back, failures recorded and retried once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tljax import job
from tljax.sweep.report import Report, report
from tljax.sweep.spec import (
    ATTEMPTS,
    ERROR_FILE,
    LOG_FILE,
    MODES,
    POINT_FILE,
    ROOT,
    RUNS,
    SWEEP_FILE,
    Point,
    command,
    job_config,
    last_line,
    points,
    spec,
    take_shard,
    write_text_atomic,
)

log = logging.getLogger("tljax")


class RunFailed(RuntimeError):
    """A `python -m experiments.finetune` process ended with an error."""


@dataclass
class Outcome:
    """What happened to one point in this invocation."""

    point: Point
    status: str  # "finished" (done before, not trained), "completed" (trained now), "failed" (every attempt)
    attempts: int
    seconds: float
    results: dict | None = None
    error: str = ""  # the last line of the last error


@dataclass
class SweepResult:
    """What `run` returns: the outcome of every point run here and the report of the whole sweep."""

    workdir: Path
    outcomes: list[Outcome]
    report: Report

    @property
    def failed(self) -> list[str]:
        return [o.point.name for o in self.outcomes if o.status == "failed"]


def run(
    sweep_config,
    workdir: str | os.PathLike,
    *,
    parallel: int = 1,
    mode: str = "inprocess",
    shard: tuple[int, int] | None = None,
    progress: bool = False,
    compilation_cache: str | None = None,
    echo: Callable[[str], None] = log.info,
) -> SweepResult:
    """Runs every point not finished yet, each in `workdir/runs/<point>`, then writes the report.

    Args:
      parallel: runs at a time (mode "subprocess" only).
      mode: "inprocess" (`job.run` here) or "subprocess" (`python -m experiments.finetune` per run).
      shard: (i, n): only points i, i + n, ... (one process per host).
      progress: the job's progress bar (mode "inprocess").
      compilation_cache: passed to each subprocess as --compilation_cache (None: experiments.finetune's default).
      echo: receives one line per event (start, finish, failure).

    Returns:
      The outcomes of this invocation's points and the report of the whole sweep (failures listed, not raised).

    Raises:
      ValueError: a bad sweep config or an unknown config key in any point, before anything runs.
    """
    s = spec(sweep_config)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    if parallel < 1 or (mode == "inprocess" and parallel != 1):
        raise ValueError(f"parallel={parallel}: runs at a time >= 1, and more than one needs mode 'subprocess'")
    workdir = Path(workdir).resolve()
    todo = points(s) if shard is None else take_shard(points(s), *shard)
    configs = [job_config(s, p, workdir) for p in todo]  # every key is checked before anything trains
    for stage, sub in s["before"].items():  # earlier stages (pre-training) first, each a sweep of its own
        kw = dict(parallel=parallel, mode=mode, shard=shard, progress=progress, compilation_cache=compilation_cache)
        run(sub, workdir / stage, **kw, echo=lambda line, stage=stage: echo(f"{stage} {line}"))
        _wait_for_stage(workdir / stage, stage, poll=None if shard is None else STAGE_POLL_SECONDS, echo=echo)
    write_text_atomic(workdir / SWEEP_FILE, json.dumps(s, indent=1))

    def one(index: int, point: Point, config) -> Outcome:
        folder = workdir / RUNS / point.folder
        if mode == "inprocess":
            launch = lambda: _inprocess(config, folder, progress)
        else:
            launch = lambda: _subprocess(command(folder, compilation_cache=compilation_cache), folder)
        tag = f"[{index + 1}/{len(todo)}] {point.name}"
        return _run_point(point, config, folder, launch, lambda line: echo(f"{tag}: {line}"))

    if parallel == 1:  # in this thread: the job's preemption handler needs the main thread
        outcomes = [one(i, p, c) for i, (p, c) in enumerate(zip(todo, configs, strict=True))]
    else:
        with ThreadPoolExecutor(parallel) as pool:
            outcomes = list(pool.map(one, range(len(todo)), todo, configs))
    return SweepResult(workdir, outcomes, report(workdir))


STAGE_POLL_SECONDS = 30.0


def _wait_for_stage(folder: Path, stage: str, poll: float | None, echo) -> None:
    """Returns once every run of the stage in `folder` has finished; raises `RunFailed` if one failed. `poll`
    (sharded sweeps: other hosts run the other points): check again every `poll` seconds while runs are missing."""
    while True:
        runs = report(folder).runs
        failed = [r.point.name for r in runs if r.status in ("failed", "stale")]
        if failed:
            raise RunFailed(
                f"stage {stage!r}: run(s) {failed} failed, and later stages need them; see their error.txt under "
                f"{folder / RUNS}, fix the cause and run the sweep again (finished runs are kept)"
            )
        missing = [r.point.name for r in runs if r.status == "missing"]
        if not missing:
            return
        if poll is None:
            raise RunFailed(f"stage {stage!r}: run(s) {missing} did not finish")
        echo(f"stage {stage!r}: waiting for {len(missing)} run(s) of other shards, e.g. {missing[0]}")
        time.sleep(poll)


def _run_point(point: Point, config, folder: Path, launch: Callable[[], dict], echo) -> Outcome:
    """Runs one point, retrying once; a finished one is read by `job.run` (which rejects a changed config)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / POINT_FILE, json.dumps(dataclasses.asdict(point), indent=1))
    finished = (folder / job.RESULTS).is_file()
    if finished:
        launch = lambda: job.run(config, folder, progress=False)
    t0, error = time.perf_counter(), ""
    if not finished:
        echo("running")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            results = launch()
        except Exception as e:  # a failed run is reported and the sweep goes on (an interrupt stops it)
            text = str(e) if isinstance(e, RunFailed) else "".join(traceback.format_exception(e))
            _record_error(folder, attempt, text)
            error = last_line(text)
            retry = "retrying" if attempt < ATTEMPTS else "giving up"
            echo(f"attempt {attempt} of {ATTEMPTS} failed ({error}); {retry}; see {folder / ERROR_FILE}")
            continue
        seconds = time.perf_counter() - t0
        status = "finished" if finished else "completed"
        echo(f"{'finished before' if finished else f'completed in {seconds:.0f} s'}: {_brief(results)}")
        return Outcome(point, status, attempt, seconds, results)
    return Outcome(point, "failed", ATTEMPTS, time.perf_counter() - t0, None, error)


def _brief(results: Mapping) -> str:
    test = results.get("test_accuracy")
    return "test_accuracy " + ("n/a" if test is None else f"{test:.4f}")


def _inprocess(config, folder: Path, progress: bool) -> dict:
    with _logged_to(folder / LOG_FILE):
        return job.run(config, folder, progress=progress)


@contextlib.contextmanager
def _logged_to(path: Path) -> Iterator[None]:
    """tljax's INFO lines (plan, compile times, resume) of one in-process run also go to its log.txt."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    level = log.level
    log.addHandler(handler)
    if not level or level > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


_CHILDREN: set[subprocess.Popen] = set()  # runs of mode "subprocess" in flight
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


class Stopped(BaseException):
    """The sweep was stopped: no run starts or is retried (not an `Exception`, so `_run_point` does not retry)."""


def stop_children(sig: int = signal.SIGTERM) -> None:
    """Sends `sig` to every run in flight and starts no more: SIGTERM makes each save a checkpoint and exit
    (preemption), so a sweep that is stopped stops its runs too, and its next invocation resumes them instead of
    training beside them."""
    _STOPPING.set()
    with _CHILDREN_LOCK:
        for child in _CHILDREN:
            child.send_signal(sig)


def _subprocess(cmd: list, folder: Path) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with open(folder / LOG_FILE, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        env = {**os.environ, "PYTHONPATH": path}  # XLA_FLAGS, thread counts, devices: as here
        with _CHILDREN_LOCK:
            if _STOPPING.is_set():
                raise Stopped(f"the sweep was stopped before {folder.name} started")
            child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            _CHILDREN.add(child)
        try:
            code = child.wait()
        except BaseException:  # KeyboardInterrupt, SystemExit from a signal handler: the run must not go on alone
            if not _STOPPING.is_set():
                child.send_signal(signal.SIGTERM)
            child.wait()
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(child)
    if _STOPPING.is_set():
        raise Stopped(f"{folder.name} stopped with the sweep (exit status {code}); rerun the sweep to resume it")
    if code != 0:
        tail = "\n".join((folder / LOG_FILE).read_text(errors="replace").splitlines()[-30:])
        raise RunFailed(f"{tail}\nexit status {code} (the whole output: {folder / LOG_FILE})")
    return json.loads((folder / job.RESULTS).read_text())


def _record_error(folder: Path, attempt: int, text: str) -> None:
    """error.txt holds this invocation's attempts (the first one starts it afresh)."""
    path = folder / ERROR_FILE
    before = path.read_text() + "\n" if attempt > 1 and path.is_file() else ""
    header = f"attempt {attempt} of {ATTEMPTS}, {time.strftime('%Y-%m-%d %H:%M:%S')}"
    write_text_atomic(path, f"{before}{header}\n{text.rstrip()}\n")
