"""Run metrics: JSONL file and TensorBoard event files in the work directory, a tqdm bar on the console.

Only process 0 writes (on several hosts every process computes the same global metrics); without a work directory
only the bar is shown.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax


class MetricWriter:
    """Writes `{"step": s, "split": "train"|"eval", ...}` lines to `metrics.jsonl` and scalars to TensorBoard."""

    def __init__(
        self,
        workdir: str | Path | None,
        *,
        total_steps: int,
        initial_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
    ):
        self.enabled = jax.process_index() == 0
        self._file = self._tb = self._bar = None
        if not self.enabled:
            return
        if workdir is not None:
            self._open_files(Path(workdir), tensorboard, initial_step)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
        self._last = (time.perf_counter(), initial_step)

    def _open_files(self, workdir: Path, tensorboard: bool, initial_step: int) -> None:
        """Appends to the run's logs from `initial_step` on: rows and events of later steps (a run that went past
        the checkpoint it resumes from, e.g. killed, or rolled back from a damaged checkpoint) are dropped first, so
        each step is logged once."""
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "metrics.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= initial_step]
            if len(kept) != len(lines):
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(kept))
                tmp.replace(path)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the events at and after it that the log holds from before
            self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=initial_step + 1)

    def write(self, step: int, split: str, metrics: dict, **extra) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _num(v) for k, v in metrics.items()}, **extra}
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def progress(self, step: int, metrics: dict, examples_per_step: int) -> dict:
        """Advances the bar to `step`, showing loss and examples/s; returns the throughput figures."""
        now, (then, last_step) = time.perf_counter(), self._last if self.enabled else (0.0, step)
        if not self.enabled:
            return {}
        rate = (step - last_step) * examples_per_step / max(now - then, 1e-9)
        self._last = (now, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{_num(metrics.get('loss', math.nan)):.4f}", ex_per_s=f"{rate:.1f}")
        return {"examples_per_second": rate}

    def close(self) -> None:
        for handle in (self._bar, self._tb, self._file):
            if handle is not None:
                handle.close()


def _num(v):
    v = float(v)
    return int(v) if v.is_integer() and abs(v) < 2**53 else v
