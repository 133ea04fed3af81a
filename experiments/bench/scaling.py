"""`scaling`: examples/s of full fine-tuning at 1, 2, 4, 8 devices, data parallel and FSDP, one global batch.

Each device count runs in its own process. The step is the engine's: `parallel.Placement(mode, devices=n)` places the
state (`engine.initial_state`) and the batch and compiles `make_train_step` with explicit shardings. On a CPU host
the devices are fake (`XLA_FLAGS=--xla_force_host_platform_device_count=n`): they share the same cores, so the
numbers show the overhead of partitioning the step (collectives, smaller matmuls), not a speed-up; on an
accelerator host, counts above the real device count are skipped.

    python -m experiments.bench scaling                  # real MiniLM-L6, global batch 32 x 128
    python -m experiments.bench scaling --quick
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

from experiments.bench import peer

PARALLEL_MODES = ("data", "fsdp")
FAKE_NOTE = "fake CPU devices share the host's cores: this shows partitioning overhead, not speed-up"


def measure(s: dict, n: int, quick: bool) -> dict:
    """{mode: step seconds} at `n` devices in this process (empty when fewer devices exist)."""
    import jax

    from experiments.bench.common import time_fn
    from tljax import parallel

    if jax.device_count() < n:
        return {"skipped": f"{jax.device_count()} devices"}
    loaded = peer.jax_load(s)
    local = peer.make_batch(s)
    out = {"platform": jax.devices()[0].platform}
    for mode in PARALLEL_MODES:
        min_size = 0 if quick else parallel.FSDP_MIN_SIZE
        step, state, batch = peer.jax_placed_step(loaded, "full", local, n, mode, fsdp_min_size=min_size)
        holder = {"state": state}

        def one(step=step, holder=holder, batch=batch):
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        out[mode] = time_fn(one, reps=3 if quick else 5)
        del holder
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help=f"one of {sorted(peer.MODELS)} (default minilm; --quick: "
                        "tiny-bert)")  # fmt: skip
    parser.add_argument("--devices", default="1,2,4,8", help="comma list of device counts (each divides the batch)")


def _counts(value: str, batch: int) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 or batch % c for c in counts):
        raise ValueError(f"--devices {value!r}: give positive device counts that divide the batch ({batch})")
    return counts


def run(quick: bool, model=None, devices="1,2,4,8") -> list[dict]:
    from experiments.bench.common import emit

    name = model or ("tiny-bert" if quick else "minilm")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tljax-scaling-") as folder:
        s = peer.checkpoints([name], folder)[name]
        for n in _counts(devices, s["batch"]):
            flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
            env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}
            cmd = [sys.executable, "-m", "experiments.bench.scaling", json.dumps(s), str(n)] + ["--quick"] * quick
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    ran = {n: r for n, r in results.items() if "skipped" not in r}
    if not ran:
        raise ValueError(f"no device count in {devices!r} could run: {results}")
    one = ran[min(ran)]
    note = FAKE_NOTE if one["platform"] == "cpu" else "real devices"
    rows = []
    for n, r in ran.items():
        common = {"model": name, "global_batch": s["batch"], "devices": n, "platform": r["platform"], "note": note}
        for mode in PARALLEL_MODES:
            where = f"scaling/{mode}/{n}"
            rows.append(emit(where, "examples_per_s", s["batch"] / r[mode], step_ms=1e3 * r[mode], **common))
            rows.append(emit(where, "speedup_over_1", one[mode] / r[mode], baseline_devices=min(ran), **common))
    return rows


if __name__ == "__main__":  # one device count, in its own process (run() starts these)
    print(json.dumps(measure(json.loads(sys.argv[1]), int(sys.argv[2]), "--quick" in sys.argv)))
