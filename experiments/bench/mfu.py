"""`mfu`: model FLOPs utilisation of full fine-tuning, against the device's peak measured in the same run.

Peak: the FLOP/s of back-to-back jitted `product`s sustained over 2 s in the dtype the step computes in
(`--precision` auto: f32 on CPU, bf16 on an accelerator), at the best of two sizes, measured in five rounds
alternating with the step's. Model FLOPs per step: XLA's cost analysis of the train step (forward, backward, AdamW)
compiled once more without dropout for the count (XLA counts the dropout-mask hash's integer operations as flops:
`xla_flops_with_dropout`; the timed step keeps dropout on), cross-checked against the 6 * N * tokens rule (N:
non-embedding parameters) and against 6 * N * tokens plus the attention-score term 6 * layers * positions * width
per token (Kaplan et al. 2020); `xla_over_6nt` is their ratio. MFU = XLA FLOPs per step / step time / peak (median
of the rounds; `mfu_6nt`: with the 6NT count; `mfu_best_peak`: against the best round's peak, the conservative
figure where the CPU drifts; `mfu_paired`: the median over rounds of each round's step against the same round's
peak, the figure that a drift between rounds moves least).

    python -m experiments.bench mfu                    # real MiniLM-L6, batch 32 x 128
    python -m experiments.bench mfu --model bert-base  # any `bench peer` model
    python -m experiments.bench mfu --model vit-b16 --batch 128   # another batch than the model's 32 (a GPU's
                                                                  # utilisation grows with it)
    python -m experiments.bench mfu --quick
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.bench mfu --jax_devices 2

`--jax_devices N`: the step data parallel over N devices (on a CPU, fake devices run concurrently, e.g. one per
core; the process must be started with that many: XLA_FLAGS as above). The FLOP count is the one-device program's
(the same model FLOPs; a partitioned program's cost analysis counts one shard).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from experiments.bench import peer
from experiments.bench.common import emit, host_cpu, time_fn
from tljax import tree

PEAK_SECONDS = 2.0  # each round's matmul burst
NOT_MATMUL = r"(/embedding$|position_embeddings$|cls_token$)"  # lookups and additions: no multiply-adds


@jax.jit
def product(a, b):
    """The peak's product, accumulating in float32: the form of the step's bf16 products on every platform (XLA:CPU
    widens a bf16 product with a bf16 result to float32, at less than half the speed of its bf16 kernels)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def matmul_flops(n: int, dtype, reps: int) -> float:
    """FLOP/s of a jitted n x n @ n x n matmul (median of `reps`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    return 2 * n**3 / time_fn(product, a, a, reps=reps)


def sustained_matmul_flops(n: int, dtype, seconds: float) -> float:
    """FLOP/s of back-to-back n x n @ n x n matmuls over about `seconds`: a shared VM's speed moves within seconds
    (a 5 ms matmul's median ran anywhere from 220 to 441 GFLOP/s in one minute), so the peak that a step's time
    is held against must be averaged over a like stretch of time."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    jax.block_until_ready(product(a, a))
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(product(a, a))
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - start)


def peak_flops(sizes, dtype, reps: int) -> tuple[float, int]:
    """(best FLOP/s, its size) of an n x n @ n x n matmul over `sizes`."""
    return max((matmul_flops(n, dtype, reps), n) for n in sizes)


def paired(step, peak, rounds: int, reps: int) -> tuple[list[float], list[float]]:
    """(the step seconds, the peak FLOP/s) of every round, over `rounds` rounds that each time the step and then
    the peak: a shared or throttled CPU drifts (on a cloud VM by up to 2x between seconds), and the ratio must
    compare the same minutes."""
    steps, peaks = [], []
    for _ in range(rounds):
        steps.append(time_fn(step, reps=reps))
        peaks.append(peak())
    return steps, peaks


def flop_estimates(loaded, s: dict) -> dict:
    """The 6 * N * tokens estimate of one training step and its attention-score term."""
    flat = tree.flatten(loaded.params)
    n = sum(x.size for p, x in flat.items() if not re.search(NOT_MATMUL, p))
    tokens = s["batch"] * peer.tokens_per_example(s)
    c = loaded.hf_config
    attention = 6 * c.num_hidden_layers * peer.tokens_per_example(s) * c.hidden_size * tokens
    return {"non_embedding_params": n, "tokens": tokens, "six_n_tokens": 6 * n * tokens, "attention": attention}


def check_devices(jax_devices: int) -> None:
    if not 1 <= jax_devices <= jax.device_count():
        raise ValueError(f"--jax_devices {jax_devices}: {jax.device_count()} device(s) here; on a CPU start the "
                         f"process with XLA_FLAGS=--xla_force_host_platform_device_count={jax_devices}")  # fmt: skip


def model_flops(s: dict, batch) -> float:
    """XLA's FLOP count of the full fine-tuning step without dropout (compiled, not run): the model FLOPs (with
    dropout on, XLA also counts the mask hash's integer operations)."""
    no_dropout = peer.jax_load(s, dropout=0.0, attention_dropout=0.0)
    compiled = peer.jax_compile(no_dropout, peer.jax_partition(no_dropout, "full", batch), batch)
    return compiled.cost_analysis().get("flops", float("nan"))


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help=f"one of {sorted(peer.MODELS)} (default minilm; --quick: "
                        "tiny-bert)")  # fmt: skip
    parser.add_argument("--jax_devices", type=int, default=1, help="data parallel over N devices (CPU: fake ones)")
    parser.add_argument("--batch", dest="batch_size", type=int, default=None,
                        help="examples per step (default: the model's, 32)")  # fmt: skip
    peer.add_precision_argument(parser)


def run(
    quick: bool, model=None, jax_devices: int = 1, precision: str = "auto", attention: str = "eager", batch_size=None
) -> list[dict]:
    name = model or ("tiny-bert" if quick else "minilm")
    check_devices(jax_devices)
    if batch_size is not None and (batch_size < 1 or batch_size % jax_devices):
        raise ValueError(f"--batch {batch_size}: a positive count divisible by --jax_devices {jax_devices}")
    device = jax.devices()[0]
    dtype = jnp.bfloat16 if peer.bf16({"precision": precision}, device.platform) else jnp.float32
    sizes = (256, 512) if quick else ((1024, 2048) if device.platform == "cpu" else (4096, 8192))
    reps = 3 if quick else 5
    _, size = peak_flops(sizes, dtype, reps)
    common = {"device": device.device_kind, "platform": device.platform, "host_cpu": host_cpu(),
              "jax_devices": jax_devices, "dtype": jnp.dtype(dtype).name, "attention": attention}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tljax-mfu-") as folder:
        s = peer.checkpoints([name], folder, precision, attention)[name]
        s = {**s, "batch": batch_size or s["batch"]}
        loaded = peer.jax_load(s)
        batch = jax.device_put(peer.make_batch(s))
        compiled, state, part = peer.jax_step(loaded, "full", batch)
        with_dropout = compiled.cost_analysis().get("flops", float("nan"))
        if jax_devices > 1:
            compiled, state, placed = peer.jax_placed_step(loaded, "full", peer.make_batch(s), jax_devices)
        holder = {"state": state}
        timed_batch = placed if jax_devices > 1 else batch

        def step():
            holder["state"], metrics = compiled(holder["state"], timed_batch)
            return metrics["loss"]

        burst = 0.05 if quick else PEAK_SECONDS
        round_seconds, peaks = paired(step, lambda: sustained_matmul_flops(size, dtype, burst), 2 if quick else 5, reps)
        xla = model_flops(s, batch)
    seconds, peak, best = statistics.median(round_seconds), statistics.median(peaks), max(peaks)
    per_round = [xla / t / p for t, p in zip(round_seconds, peaks, strict=True)]
    rows = [
        emit(
            "mfu/peak",
            "peak_flops_per_s",
            peak,
            rounds=[round(p / 1e9, 1) for p in peaks],
            matmul_size=size,
            **common,
        ),  # fmt: skip
        emit("mfu/peak", "best_peak_flops_per_s", best, **common),
    ]
    est = flop_estimates(loaded, s)
    with_attention = est["six_n_tokens"] + est["attention"]
    common.update(model=name, batch=s["batch"], tokens=est["tokens"], params=part.count(True))
    where = f"mfu/{name}/full"
    rows += [
        emit(where, "step_ms", 1e3 * seconds, **common),
        emit(where, "xla_flops_per_step", xla, **common),
        emit(where, "xla_flops_with_dropout", with_dropout, **common),
        emit(
            where, "six_n_tokens_flops", est["six_n_tokens"], non_embedding_params=est["non_embedding_params"], **common
        ),  # fmt: skip
        emit(where, "xla_over_6nt", xla / est["six_n_tokens"], **common),
        emit(where, "xla_over_6nt_plus_attention", xla / with_attention, **common),
        emit(where, "achieved_flops_per_s", xla / seconds, **common),
        emit(where, "mfu", xla / seconds / peak, peak_flops_per_s=peak, **common),
        emit(where, "mfu_6nt", est["six_n_tokens"] / seconds / peak, **common),
        emit(where, "mfu_best_peak", xla / seconds / best, best_peak_flops_per_s=best, **common),  # conservative
        emit(where, "mfu_paired", statistics.median(per_round), rounds=[round(m, 3) for m in per_round], **common),
    ]
    return rows
