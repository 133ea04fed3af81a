"""`memory`: what full fine-tuning, top-3 and head-only training take in memory, and the largest batch each fits.

Each mode runs in its own process. At the benchmark batch it reports the peak host RSS while training (on a GPU:
the device's `peak_bytes_in_use`), its growth over the process with the model loaded and the step compiled
(`train_mb`: state, gradients, activations; the high-water mark is reset after compiling, as in `bench peft`),
optimizer-state bytes and XLA's account of the step. Then it searches the largest batch that fits: doubling from
the benchmark batch (halving from it if that does not fit), then bisecting. On CPU "fits" means
`train_mb <= --memory_cap_mb` (each probe compiles its own step, frees what the last one left to the OS and measures
again); on a GPU it means the step runs without running out of device memory (the device's own limit).

    python -m experiments.bench memory --memory_cap_mb 4096   # real MiniLM-L6, seq 128
    python -m experiments.bench memory --quick
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile

from experiments.bench import peer

QUICK_CAP_MB = 48.0


def _trim() -> None:
    """Hands freed heap pages back to the OS, so a probe's peak is not hidden by pages the last one left resident."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def probe(loaded, s: dict, part, batch_size: int, steps: int = 2) -> dict | None:
    """Memory of `steps` training steps at `batch_size` in this process; None when the device runs out of memory."""
    import jax

    from experiments.bench.common import reset_peak_rss, status_mb, xla_step_bytes
    from tljax import partition

    device = jax.devices()[0]
    try:  # on a GPU, compiling (autotuning) a too-large batch can run out of memory as well
        batch = jax.device_put(peer.make_batch(s, batch_size))
        compiled = peer.jax_compile(loaded, part, batch)
        _trim()
        reset_peak_rss()
        base = status_mb("VmRSS")  # model loaded, step compiled, batch in place
        state = peer.fresh_state(loaded, part)
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None
    stats = device.memory_stats() if device.platform != "cpu" else None
    peak = stats["peak_bytes_in_use"] / 2**20 if stats else status_mb("VmHWM")
    opt_mb = partition.state_nbytes(state.opt_state) / 2**20
    del state, metrics
    return {"batch": batch_size, "peak_mb": peak, "train_mb": peak if stats else peak - base,
            "peak_kind": "device" if stats else "rss", "opt_state_mb": opt_mb,
            "xla_step_mb": xla_step_bytes(compiled) / 2**20}  # fmt: skip


def largest_batch(fits, start: int, limit: int, resolution: int = 8) -> tuple[int, bool]:
    """(largest batch b with fits(b), whether `limit` stopped the search): doubling from `start` while it fits, then
    bisecting until the bracket is narrower than b / resolution (from [0, start] when `start` does not fit: halving
    down from it)."""
    lo, b = 0, start
    while b <= limit and fits(b):
        lo, b = b, 2 * b
    if b > limit:
        return lo, True
    hi = b
    while hi - lo > max(1, lo // resolution):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def measure(s: dict, mode: str, cap_mb: float | None, limit: int) -> dict:
    """One mode in this process: memory at the benchmark batch, then the largest batch under the cap."""
    import jax

    loaded = peer.jax_load(s)
    part = peer.jax_partition(loaded, mode, peer.make_batch(s, 1))
    probed = {s["batch"]: probe(loaded, s, part, s["batch"])}
    at_batch = probed[s["batch"]]
    if at_batch is None:
        raise ValueError(f"{mode} does not fit even the benchmark batch {s['batch']}")
    on_cpu = jax.devices()[0].platform == "cpu"

    def fits(b: int) -> bool:
        if b not in probed:
            probed[b] = probe(loaded, s, part, b)
        return probed[b] is not None and (not on_cpu or probed[b]["train_mb"] <= cap_mb)

    # from the benchmark batch even where it is over the cap: bisecting down from it takes log2(batch / boundary)
    # probes, where doubling up from 1 took log2(boundary) (each probe compiles a step: ~4 s for the tiny BERT)
    best, capped = largest_batch(fits, s["batch"], limit)
    cap = cap_mb if on_cpu else jax.devices()[0].memory_stats()["bytes_limit"] / 2**20
    return {**at_batch, "mode": mode, "trainable_params": part.count(True), "largest_batch": best,
            "search_capped": capped, "cap_mb": cap, "device": jax.devices()[0].platform}  # fmt: skip


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help=f"one of {sorted(peer.MODELS)} (default minilm; --quick: "
                        "tiny-bert)")  # fmt: skip
    parser.add_argument("--modes", default=peer.ALL_MODES, help=f"comma list of {peer.MODES}")
    parser.add_argument(
        "--memory_cap_mb",
        type=float,
        default=None,
        help=f"CPU: training memory a batch may take (default 4096; --quick: {QUICK_CAP_MB})",
    )
    parser.add_argument("--max_batch", type=int, default=None, help="stop the search here (default 4096; --quick 16)")
    peer.add_precision_argument(parser)


def run(
    quick: bool,
    model=None,
    modes=peer.ALL_MODES,
    memory_cap_mb=None,
    max_batch=None,
    precision="auto",
    attention="eager",
) -> list[dict]:
    from experiments.bench.common import emit

    name = model or ("tiny-bert" if quick else "minilm")
    modes = peer._names(modes, peer.MODES, "modes")
    cap = memory_cap_mb or (QUICK_CAP_MB if quick else 4096.0)
    if cap <= 0:
        raise ValueError(f"--memory_cap_mb must be positive, got {cap}")
    limit = max_batch or (16 if quick else 4096)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tljax-memory-") as folder:
        s = peer.checkpoints([name], folder, precision, attention)[name]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big buffers mmapped: freed ones leave the RSS
        for mode in modes:
            cmd = [sys.executable, "-m", "experiments.bench.memory", json.dumps(s), mode, str(cap), str(limit)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for mode, r in results.items():
        extra = {k: r[k] for k in ("batch", "device", "peak_kind", "trainable_params")}
        extra.update(
            model=name,
            precision=precision,
            attention=attention,
            **({"seq": s["seq"]} if s["kind"] == "text" else {"image": s["image"]}),
        )
        for metric in ("peak_mb", "train_mb", "opt_state_mb", "xla_step_mb"):
            rows.append(emit(f"memory/{mode}", metric, r[metric], **extra))
        rows.append(emit(f"memory/{mode}", "largest_batch", r["largest_batch"], cap_mb=r["cap_mb"],
                         search_capped=r["search_capped"], **extra))  # fmt: skip
    if "full" in results:
        for mode in set(results) - {"full"}:
            ratio = results[mode]["train_mb"] / results["full"]["train_mb"]
            rows.append(emit(f"memory/{mode}", "train_mb_over_full", ratio, model=name))
    return rows


if __name__ == "__main__":  # one mode, in its own process (run() starts these)
    _s, _mode, _cap, _limit = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(measure(_s, _mode, _cap, _limit)))
